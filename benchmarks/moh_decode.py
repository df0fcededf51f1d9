"""MoH decode benchmark: decode attention and decode-step time vs the share of active KV groups.

Two parts, arms interleaved round by round (so load drifts hit every arm alike), median and spread printed:

- ``attention``: one decode step's attention ``[B, Hq, 1, D]`` over a cache of N tokens (default LLaMA-3-8B's
  geometry, Hq/Hkv/D = 32/8/128): the stock SDPA call transformers makes for an unpadded decode step
  (``enable_gqa``), dense SDPA with the G heads of a group packed as rows, and
  :func:`vlm_accel.kernels.head_sparse_decode_attention` with 100 / 75 / 50 / 25 % of the KV groups active (a
  seeded random choice per row, so runs of active groups are split as a router would leave them);
- ``step``: a whole decode step of a mid-size LLaVA (random weights; text model hidden 1024, 16 query / 8 KV heads
  of dim 128, 4 layers) on an N-token cache: unpatched, every head on the head-sparse op (a benchmark-only method;
  the same op reading every group, which separates the op's own speed from skipping), and ``moh`` (qnorm router,
  ``per_kv_group=True``) at 75 / 50 / 25 %. The cache comes from a short real prefill, extended with random K/V to N
  tokens (an N-token prefill would take minutes on a CPU and does not change what a decode step reads).

Two ratios per row: vs the stock path and vs all groups on the same op. The second is what skipping KV groups buys;
the first also contains the op's packing (on CPU, SDPA with ``enable_gqa`` is several times slower than the packed
form).

CPU: one thread, per-call thread time (``time.thread_time``). CUDA: events, and the Triton path as an extra arm.

    OMP_NUM_THREADS=1 python benchmarks/moh_decode.py --json docs/bench/moh_decode_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vlm_accel import register_method
from vlm_accel.config import MethodConfig
from vlm_accel.kernels import head_sparse_decode_attention
from vlm_accel.methods.base import KIND_GATES, GateContext, HeadGates, Method


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call: CUDA events on a GPU, this thread's CPU time otherwise."""
    if device.type == "cuda":

        def run(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1000

        return run

    def run(fn):
        start = time.thread_time()
        fn()
        return time.thread_time() - start

    return run


def interleaved(arms: dict[str, Callable[[], object]], device, rounds: int, warmup: int = 2) -> dict[str, dict]:
    """Median and spread (min, max) of each arm over ``rounds`` rounds, one call of every arm per round."""
    run = timer(device)
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            samples[name].append(run(fn))
    return {name: {"median_ms": 1e3 * statistics.median(s), "min_ms": 1e3 * min(s), "max_ms": 1e3 * max(s)}
            for name, s in samples.items()}  # fmt: skip


def group_masks(batch: int, hq: int, hkv: int, share: float, seed: int, device) -> torch.Tensor:
    """Head mask ``[B, Hq]`` turning on ``share`` of the KV groups (all G heads of each), seeded per row."""
    g = torch.Generator().manual_seed(seed)
    active = round(share * hkv)
    groups = torch.zeros(batch, hkv, dtype=torch.bool)
    for b in range(batch):
        groups[b, torch.randperm(hkv, generator=g)[:active]] = True
    return groups.repeat_interleave(hq // hkv, dim=1).to(device)


def bench_attention(args, device, dtype) -> list[dict]:
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    for n in args.tokens:
        for batch in args.batch:
            g = torch.Generator(device="cpu").manual_seed(n + batch)
            q = torch.randn(batch, hq, 1, d, generator=g).to(device, dtype)
            k = torch.randn(batch, hkv, n, d, generator=g).to(device, dtype)
            v = torch.randn(batch, hkv, n, d, generator=g).to(device, dtype)
            packed = q.view(batch, hkv, hq // hkv, d)
            arms: dict[str, Callable[[], object]] = {
                # what transformers' sdpa path runs for an unpadded decode step (no mask: enable_gqa)
                "stock sdpa (enable_gqa)": functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True),
                # the fastest dense torch form on CPU: G query heads as G rows of their KV head
                "dense sdpa (packed G rows)": functools.partial(F.scaled_dot_product_attention, packed, k, v),
            }
            for share in args.shares:
                mask = group_masks(batch, hq, hkv, share, seed=7, device=device)
                arms[f"head-sparse {share:.0%}"] = functools.partial(head_sparse_decode_attention, q, k, v, mask)
                if device.type == "cuda" and args.triton:
                    arms[f"head-sparse triton {share:.0%}"] = functools.partial(
                        head_sparse_decode_attention, q, k, v, mask, use_triton=True
                    )
            result = interleaved(arms, device, args.rounds)
            stock = result["stock sdpa (enable_gqa)"]["median_ms"]
            full = result.get("head-sparse 100%", result["stock sdpa (enable_gqa)"])["median_ms"]
            for name, r in result.items():
                rows.append({"part": "attention", "tokens": n, "batch": batch, "arm": name, **r,
                             "speedup_vs_stock": stock / r["median_ms"], "speedup_vs_all_groups": full / r["median_ms"]})  # fmt: skip
            print_rows(rows[-len(result) :])
    return rows


@dataclass
class AllGroupsConfig(MethodConfig):
    """Benchmark-only: every head on, decode on the head-sparse op (the op's all-groups cost, as a baseline)."""

    method_name: ClassVar[str] = "bench_all_groups"


class AllGroups(Method):
    config_cls = AllGroupsConfig
    kind_rank = KIND_GATES

    def head_gates(self, layer: int, ctx: GateContext, state) -> HeadGates | None:
        batch, heads, q_len, _ = ctx.query.shape
        return HeadGates(torch.ones(batch, q_len, heads, dtype=torch.bool, device=ctx.query.device), True)


def mid_size_llava(device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536,
                       pad_token_id=0)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=5, image_seq_length=4)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(device, dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def bench_step(args, device, dtype) -> list[dict]:
    import copy

    from transformers import DynamicCache

    from vlm_accel import patch_model
    from vlm_accel.methods.moh import MoHConfig

    base = mid_size_llava(device, dtype)
    text = base.config.text_config
    configs = {"unpatched": None, "all groups on the sparse op": AllGroupsConfig(),
               **{f"moh qnorm kv-groups {s:.0%}": MoHConfig(active_heads=s, per_kv_group=True)
                  for s in args.shares if s < 1}}  # fmt: skip
    # one copy of the model per arm (patches cannot overlap on one model), each patched for the whole run
    models = {name: base if config is None else copy.deepcopy(base) for name, config in configs.items()}
    patches = [patch_model(models[name], config) for name, config in configs.items() if config is not None]
    rows = []
    try:
        for n in args.tokens:
            steps: dict[str, Callable[[], object]] = {}
            for name, model in models.items():
                prompt = torch.tensor([[1, 7, 8, 9, 10, 11, 12, 13]], device=device)
                with torch.no_grad():
                    out = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True)
                g = torch.Generator(device="cpu").manual_seed(n)
                extra = n - prompt.shape[1]
                for layer in out.past_key_values.layers:  # extend every layer's cache to n tokens of random K/V
                    shape = (1, text.num_key_value_heads, extra, text.head_dim)
                    fill = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(2)]
                    layer.keys = torch.cat([fill[0], layer.keys], dim=2)
                    layer.values = torch.cat([fill[1], layer.values], dim=2)

                token = out.logits[:, -1:].argmax(-1)
                steps[name] = functools.partial(decode_step, model, out.past_key_values, token, n)
            result = interleaved(steps, device, args.rounds)
            stock = result["unpatched"]["median_ms"]
            full = result["all groups on the sparse op"]["median_ms"]
            for name, r in result.items():
                rows.append({"part": "step", "tokens": n, "batch": 1, "arm": name, **r,
                             "speedup_vs_stock": stock / r["median_ms"], "speedup_vs_all_groups": full / r["median_ms"]})  # fmt: skip
            print_rows(rows[-len(result) :])
            del steps
    finally:
        for patch in patches:
            patch.remove()
    return rows


def decode_step(model, cache, token: torch.Tensor, n: int) -> None:
    """One decode step on an ``n``-token cache, then the cache cropped back to ``n`` tokens for the next round."""
    device = token.device
    with torch.no_grad():
        model(input_ids=token, past_key_values=cache, attention_mask=torch.ones(1, n + 1, device=device),
              cache_position=torch.tensor([n], device=device), use_cache=True)  # fmt: skip
    cache.crop(-1)


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['part']:9s} N={r['tokens']:5d} B={r['batch']} {r['arm']:30s} {r['median_ms']:9.3f} ms "
              f"[{r['min_ms']:.3f}, {r['max_ms']:.3f}]  ×{r['speedup_vs_stock']:.2f} vs stock, "
              f"×{r['speedup_vs_all_groups']:.2f} vs all groups", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="attention,step")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--triton", action="store_true", help="CUDA: also time the Triton path")
    p.add_argument("--json", help="write the rows, device and command here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    register_method("bench_all_groups", AllGroups)
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    parts = args.parts.split(",")
    if "attention" in parts:
        rows += bench_attention(args, device, dtype)
    if "step" in parts:
        rows += bench_step(args, device, dtype)
    if args.json:
        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
                "command": " ".join(sys.argv), "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
