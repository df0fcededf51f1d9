"""Kernel benchmarks: Triton vs the torch baseline vs the hardware floor (research/kernels.md §5).

Run on a CUDA machine (H100 reference)::

    python benchmarks/kernels.py --json docs/bench/kernels_h100.json

Each row prints the median time (CUDA events, after warm-up), the time as a ratio to the torch baseline of the
same sweep point, the ratio to the memory-bandwidth / FLOP floor (``max(bytes / copy-bandwidth,
flops / matmul-peak)``, both measured on the device at start-up), and the peak extra memory the call
allocated.

Without CUDA it prints that the GPU numbers are owed and exits; ``--cpu-reference`` then times the torch
references only, at small shapes (a smoke test of the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from vlm_accel.kernels import (
    attention_row_probs,
    biased_attention,
    compact_kv,
    head_sparse_decode_attention,
    interpreter_active,
    triton_available,
)

GEOMETRIES = {"qwen2.5-vl-7b": (28, 4, 128), "llava-1.5-7b": (32, 32, 128)}  # (Hq, Hkv, D)
MEM_LIMIT_BYTES = 40 * 2**30  # skip sweep points whose inputs or baselines would not fit comfortably


@dataclass
class Row:
    op: str
    impl: str
    params: dict
    ms: float | None
    vs_baseline: float | None = None
    vs_floor: float | None = None
    peak_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ timing
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], dev: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds and peak extra MiB allocated by ``fn`` (CUDA events on GPU, perf_counter on
    CPU)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    peak = float("nan")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def measure_device(dev: torch.device) -> dict:
    """Achievable copy bandwidth (bytes/s, read + write) and bf16 matmul throughput (FLOP/s)."""
    if dev.type != "cuda":
        return {"bandwidth": 20e9, "flops": 1e11, "name": "cpu (nominal floors)"}
    x = torch.empty(2**29, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms, _ = time_call(lambda x=x, y=y: y.copy_(x), dev, 5, 20)
    bw = 2 * x.numel() / (ms * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    ms, _ = time_call(lambda a=a: a @ a, dev, 3, 10)
    flops = 2 * 8192**3 / (ms * 1e-3)
    return {"bandwidth": bw, "flops": flops, "name": torch.cuda.get_device_name(dev)}


def floor_ms(bytes_: float, flops: float, peaks: dict) -> float:
    return max(bytes_ / peaks["bandwidth"], flops / peaks["flops"]) * 1e3


# -------------------------------------------------------------------------------------------- torch baselines
def eager_full_probs(query_all: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """What ``output_attentions=True`` costs: repeat_kv + the full causal [B,Hq,N,N] fp32 softmax."""
    g = query_all.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    s = torch.matmul(query_all, k.transpose(-1, -2)).float() * query_all.shape[-1] ** -0.5
    n = s.shape[-1]
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=s.device).triu_(1), float("-inf"))
    return torch.softmax(s, dim=-1)


def compact_advanced_indexing(tensors, index):
    b = torch.arange(index.shape[0], device=index.device)[:, None]
    return [t[b, :, index].transpose(1, 2).contiguous() for t in tensors]


def compact_gather(tensors, index):
    out = []
    for t in tensors:
        idx = index[:, None, :, None].expand(t.shape[0], t.shape[1], index.shape[1], t.shape[3])
        out.append(torch.gather(t, 2, idx))
    return out


# ----------------------------------------------------------------------------------------------- sweeps
def _emit(rows: list[Row], new: list[Row], baseline_impl: str) -> None:
    base = next((r.ms for r in new if r.impl == baseline_impl and r.ms), None)
    for r in new:
        if base and r.ms:
            r.vs_baseline = r.ms / base
        rows.append(r)
        vb = f"{r.vs_baseline:6.2f}x" if r.vs_baseline else "     - "
        vf = f"{r.vs_floor:6.2f}x" if r.vs_floor else "     - "
        ms = f"{r.ms:9.4f}" if r.ms is not None else "     skip"
        pk = f"{r.peak_mib:9.1f}" if r.peak_mib is not None and not math.isnan(r.peak_mib) else "        -"
        params = " ".join(f"{k}={v}" for k, v in r.params.items())
        print(f"{r.op:13s} {r.impl:18s} {params:52s} {ms} ms  base {vb}  floor {vf}  peak {pk} MiB  {r.note}")


def _run(op, impl, params, fn, dev, args, floor, note="") -> Row:
    try:
        ms, peak = time_call(fn, dev, args.warmup, args.iters)
    except Exception as e:  # a failing point (OOM, unsupported backend, compile error) must not end the run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return Row(op, impl, params, None, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
    return Row(op, impl, params, ms, vs_floor=ms / floor if floor else None, peak_mib=peak, note=note)


def _torch_and_triton(op, ref_name, params, call, dev, args, floor) -> list[Row]:
    """The op through its torch reference (``call(False)``) and, unless ``--reference-only``, through Triton."""
    rows = [_run(op, ref_name, params, lambda: call(False), dev, args, floor)]
    if not args.reference_only:
        rows.append(_run(op, "triton", params, lambda: call(True), dev, args, floor))
    return rows


def sweep_row_probs(dev, dtype, peaks, args, rows, small) -> None:
    ns = [512, 1024] if small else [2048, 8192, 32768]
    ms_ = [1, 16] if small else [1, 16, 64, 256]
    bs = [1] if small else [1, 8]
    for geo, (hq, hkv, d) in GEOMETRIES.items():
        for b in bs:
            for n in ns:
                key = torch.randn(b, hkv, n, d, dtype=dtype, device=dev)
                layer_ms = None
                if not args.reference_only and b * hq * n * d * 2 * 3 < MEM_LIMIT_BYTES:
                    qa = torch.randn(b, hq, n, d, dtype=dtype, device=dev)
                    v = torch.randn_like(key)
                    layer_ms, _ = time_call(
                        lambda qa=qa, key=key, v=v, gqa=hkv != hq: F.scaled_dot_product_attention(
                            qa, key, v, is_causal=True, enable_gqa=gqa
                        ),
                        dev,
                        3,
                        max(5, args.iters // 5),
                    )
                    eager_bytes = b * hq * n * n * 4 * 2
                    if n <= 8192 and eager_bytes < MEM_LIMIT_BYTES:
                        r = _run(
                            "row_probs",
                            "eager_full",
                            {"geo": geo, "B": b, "N": n, "M": "all"},
                            lambda qa=qa, key=key: eager_full_probs(qa, key),
                            dev,
                            args,
                            None,
                            note="output_attentions-style",
                        )
                        _emit(rows, [r], "")
                    del qa, v
                for m in ms_:
                    q = torch.randn(b, hq, m, d, dtype=dtype, device=dev)
                    byt = key.numel() * key.element_size() + q.numel() * q.element_size() + b * n * 4
                    flops = 2 * b * hq * m * n * d
                    fl = floor_ms(byt, flops, peaks)
                    reduce = "head_mean" if m == 1 else "sum"
                    params = {"geo": geo, "B": b, "N": n, "M": m, "reduce": reduce}
                    new = _torch_and_triton(
                        "row_probs", "torch", params,
                        lambda tri, q=q, key=key, red=reduce: attention_row_probs(
                            q, key, None, None, red, use_triton=tri
                        ),
                        dev, args, fl,
                    )  # fmt: skip
                    if layer_ms:
                        for r in new:
                            if r.ms:
                                r.extra["pct_of_layer_sdpa"] = 100 * r.ms / layer_ms
                                r.note = (
                                    f"{r.extra['pct_of_layer_sdpa']:.2f}% of layer SDPA ({layer_ms:.3f} ms)"
                                )
                    _emit(rows, new, "torch")
                del key


def sweep_lse_sources(dev, dtype, peaks, args, rows, small) -> None:
    """SDPA causal prefill vs FlexAttention returning the LSE (single-pass row_probs pays only if flex ~
    SDPA)."""
    if dev.type != "cuda" or args.reference_only:
        return
    try:
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
    except ImportError:
        return
    flex = torch.compile(flex_attention, dynamic=False)
    hq, hkv, d = GEOMETRIES["qwen2.5-vl-7b"]
    for n in [2048, 8192, 16384]:
        q = torch.randn(1, hq, n, d, dtype=dtype, device=dev)
        k = torch.randn(1, hkv, n, d, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, 1, None, n, n, device=dev)
        fl = floor_ms(0, 2 * hq * n * n * d, peaks)  # causal: half of 4·Hq·N²·D
        params = {"N": n, "geo": "qwen2.5-vl-7b"}
        new = [
            _run(
                "lse_source",
                "sdpa_causal",
                params,
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True
                ),
                dev,
                args,
                fl,
            ),
            _run(
                "lse_source",
                "flex+lse",
                params,
                lambda q=q, k=k, v=v, bm=bm: flex(
                    q, k, v, block_mask=bm, enable_gqa=True, return_aux=AuxRequest(lse=True)
                ),
                dev,
                args,
                fl,
            ),
        ]
        _emit(rows, new, "sdpa_causal")


def sweep_compact(dev, dtype, peaks, args, rows, small) -> None:
    ls = [4] if small else [28, 32]
    ns = [1024] if small else [2048, 8192, 32768]
    bs = [1] if small else [1, 8]
    hkv_of = {28: 4, 32: 32, 4: 4}
    d = 128
    for layers in ls:
        hkv = hkv_of[layers]
        for b in bs:
            for n in ns:
                keep = n // 4
                cache_bytes = 2 * layers * b * hkv * n * d * 2
                if cache_bytes * 1.3 > MEM_LIMIT_BYTES:
                    continue
                tensors = [torch.randn(b, hkv, n, d, dtype=dtype, device=dev) for _ in range(2 * layers)]
                index = torch.stack([torch.randperm(n, device=dev)[:keep].sort().values for _ in range(b)])
                moved = 2 * len(tensors) * b * hkv * keep * d * 2  # read + write
                fl = floor_ms(moved, 0, peaks)
                params = {"L": layers, "Hkv": hkv, "B": b, "N": n, "keep": keep}
                new = [
                    _run(
                        "compact_kv",
                        "torch_index_select",
                        params,
                        lambda t=tensors, i=index: compact_kv(t, i, use_triton=False),
                        dev,
                        args,
                        fl,
                    )
                ]
                if not args.reference_only:
                    new += [
                        _run(
                            "compact_kv",
                            "adv_indexing",
                            params,
                            lambda t=tensors, i=index: compact_advanced_indexing(t, i),
                            dev,
                            args,
                            fl,
                        ),
                        _run(
                            "compact_kv",
                            "torch_gather",
                            params,
                            lambda t=tensors, i=index: compact_gather(t, i),
                            dev,
                            args,
                            fl,
                        ),
                        _run(
                            "compact_kv",
                            "triton",
                            params,
                            lambda t=tensors, i=index: compact_kv(t, i, use_triton=True),
                            dev,
                            args,
                            fl,
                        ),
                    ]
                for r in new:
                    if r.ms:
                        r.extra["GBps"] = moved / (r.ms * 1e-3) / 1e9
                        r.note = f"{r.extra['GBps']:.0f} GB/s (copy {peaks['bandwidth'] / 1e9:.0f})"
                _emit(rows, new, "torch_index_select")
                del tensors


def sweep_biased(dev, dtype, peaks, args, rows, small) -> None:
    """Reweighting overhead: SDPA without mask vs SDPA + [B,1,M,N] float mask (reference) vs Triton."""
    hq, hkv, d = GEOMETRIES["qwen2.5-vl-7b"]
    points = (
        [(1, 1, 1024), (8, 1, 1024)]
        if small
        else [(1, 1, 4096), (8, 1, 4096), (32, 1, 16384), (1, 2048, 2048), (1, 8192, 8192), (4, 4096, 4096)]
    )
    for b, m, n in points:
        q = torch.randn(b, hq, m, d, dtype=dtype, device=dev)
        k = torch.randn(b, hkv, n, d, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        bias = torch.randn(b, 1, n, device=dev)
        causal = m > 1
        byt = (2 * k.numel() + 2 * q.numel()) * k.element_size() + bias.numel() * 4
        flops = 4 * b * hq * m * n * d * (0.5 if causal else 1.0)
        fl = floor_ms(byt, flops, peaks)
        params = {"B": b, "M": m, "N": n, "causal": causal}
        new = [
            _run(
                "biased_attn",
                "sdpa_no_bias",
                params,
                lambda q=q, k=k, v=v, c=causal and m == n: F.scaled_dot_product_attention(
                    q, k, v, is_causal=c, enable_gqa=True
                ),
                dev,
                args,
                fl,
            ),
        ]
        new += _torch_and_triton(
            "biased_attn", "torch_float_mask", params,
            lambda tri, q=q, k=k, v=v, bias=bias, c=causal: biased_attention(
                q, k, v, bias, None, c, use_triton=tri
            ),
            dev, args, fl,
        )  # fmt: skip
        _emit(rows, new, "torch_float_mask")
        del q, k, v


def sweep_head_sparse(dev, dtype, peaks, args, rows, small) -> None:
    """MoH decode: reference (dense SDPA + zeroing) vs Triton that skips inactive KV groups."""
    hq, hkv, d = GEOMETRIES["qwen2.5-vl-7b"]
    g = hq // hkv
    points = [(1, 1024)] if small else [(1, 4096), (1, 16384), (32, 4096), (32, 16384)]
    for b, n in points:
        q = torch.randn(b, hq, 1, d, dtype=dtype, device=dev)
        k = torch.randn(b, hkv, n, d, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        for frac in (0.25, 0.5, 1.0):
            active_groups = max(1, round(frac * hkv))
            group_on = torch.zeros(b, hkv, dtype=torch.bool, device=dev)
            group_on[:, :active_groups] = True
            head_mask = group_on.repeat_interleave(g, dim=1)  # routing at KV-group granularity
            byt = 2 * b * active_groups * n * d * k.element_size()
            fl = floor_ms(byt, 4 * b * active_groups * g * n * d, peaks)
            params = {"B": b, "N": n, "active_kv_groups": f"{active_groups}/{hkv}"}
            new = _torch_and_triton(
                "head_sparse", "torch_sdpa_gate", params,
                lambda tri, q=q, k=k, v=v, hm=head_mask: head_sparse_decode_attention(
                    q, k, v, hm, use_triton=tri
                ),
                dev, args, fl,
            )  # fmt: skip
            _emit(rows, new, "torch_sdpa_gate")
        del q, k, v


SWEEPS = {
    "row_probs": sweep_row_probs,
    "lse": sweep_lse_sources,
    "compact": sweep_compact,
    "biased": sweep_biased,
    "head_sparse": sweep_head_sparse,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(SWEEPS), help=f"comma list of {list(SWEEPS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="small sweep (smoke test)")
    p.add_argument(
        "--cpu-reference",
        action="store_true",
        help="without CUDA, time the torch references at small shapes instead of exiting",
    )
    p.add_argument(
        "--with-interpreter",
        action="store_true",
        help="with --cpu-reference under TRITON_INTERPRET=1: also run the Triton paths (script smoke test)",
    )
    p.add_argument("--json", metavar="PATH", help="write all rows, the device and the command as JSON")
    args = p.parse_args(argv)
    args.reference_only = False

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        if not triton_available():
            print("triton is not installed: timing the torch references only")
            args.reference_only = True
    else:
        print(
            "CUDA is not available: the Triton kernels cannot be timed here, so the GPU numbers are still "
            "owed (run this script on a CUDA machine; see docs/kernels.md)."
        )
        if not args.cpu_reference:
            return 0
        dev = torch.device("cpu")
        args.reference_only = not (args.with_interpreter and interpreter_active() and triton_available())
        args.quick = True
        args.warmup, args.iters = min(args.warmup, 2), min(args.iters, 5)
        what = "torch references" if args.reference_only else "torch references and interpreted Triton"
        print(f"--cpu-reference: {what}, small shapes, CPU wall-clock (not a result).")

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    peaks = measure_device(dev)
    print(
        f"device: {peaks['name']}  copy bandwidth {peaks['bandwidth'] / 1e9:.0f} GB/s  "
        f"bf16 matmul {peaks['flops'] / 1e12:.1f} TFLOP/s  dtype {args.dtype}  torch {torch.__version__}"
    )
    rows: list[Row] = []
    for name in args.ops.split(","):
        with torch.inference_mode():
            SWEEPS[name.strip()](dev, dtype, peaks, args, rows, args.quick)
    if args.json:
        meta = {
            "command": " ".join([sys.executable, *sys.argv]),
            "device": peaks,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "rows": [asdict(r) for r in rows],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _triton_version() -> str | None:
    if not triton_available():
        return None
    import triton

    return triton.__version__


if __name__ == "__main__":
    raise SystemExit(main())
