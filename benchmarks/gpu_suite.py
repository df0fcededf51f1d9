"""The GPU evidence suite (issue #20): one command, about 10 minutes on one H100/H200, resumable.

    python benchmarks/gpu_suite.py --out runs/gpu-suite              # on a CUDA machine (bf16)
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite-dry    # every section at tiny sizes on CPU (CI)

Sections, in order (``--sections`` picks some):

- ``env``: device, versions (torch, transformers, triton, flash-attn), the command, the git commit;
- ``pytest_gpu``: ``pytest -m gpu`` over the compiled-Triton tests (fp32/bf16/fp16 vs references) and the
  flash_attention_2-vs-SDPA test of every method on every family (``tests/test_flash_route.py``);
- ``kernels``: each Triton op vs its torch reference and vs the memory-bandwidth / FLOP floor (the sweeps of
  ``benchmarks/kernels.py``);
- ``llava``: LLaVA-1.5-7B geometry (random weights; CLIP-L/336 → 576 visual tokens; Llama-7B, 32 layers), SDPA
  then flash: prefill (TTFT) and end to end at batch 1 / 8 / 32 with 32 new tokens (every arm) and 128 (headline
  arms), unpatched vs fastv / random at 50 / 25 / 11 % kept after layer 2 and pool 2×2 / 3×3, a no-op patch (its
  overhead), with FLOPs-ideal ratios;
- ``moh``: head-sparse decode attention (``vlm_accel.kernels.head_sparse_decode_attention``) vs all heads, by
  fraction of active KV groups at 4k / 16k cached tokens; plus a decode step of the ``moh`` method if registered.

Output in ``--out DIR``: ``suite.json`` (meta + every section), ``summary.md`` (tables and the issue's targets),
``plots/*.png``, ``logs/``, and ``sections/`` (one JSON per finished section, one per finished ``llava`` unit).
Rerunning with the same ``--out`` keeps what is there and runs only what is missing, so a cut run loses at most
the unit it was in. A wall-clock budget (``--budget-s``, default 570 s) caps each section; whatever a section could
not start in time is recorded as skipped with the reason. ``--dry-run`` runs every section at tiny sizes on CPU
(the test suite runs it, so the suite cannot rot); its numbers are plumbing checks, not results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import io
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_suite.py` from a bare checkout (package not installed)
    sys.path.insert(0, str(ROOT))
SECTION_ORDER = ("env", "pytest_gpu", "kernels", "llava", "moh")
FINISHED = ("done", "timeout")  # statuses a resumed run does not redo


# ------------------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class Profile:
    """Every size the suite uses; ``FULL`` on the GPU, ``DRY`` for the CPU dry-run."""

    name: str
    device: str
    dtype: str
    geometry: str  # a vlm_accel.eval.bench geometry
    batches: tuple[int, ...]
    keep_counts: tuple[int, ...]  # visual tokens kept by fastv / random: 50 / 25 / 11 % of the grid
    pool_factors: tuple[int, ...]
    layer: int  # pruning layer K
    new_tokens: tuple[int, int]  # (every arm, headline arms)
    text_tokens: int
    warmup: int
    repeats_prefill: int
    repeats_e2e: int
    attns: tuple[str, ...]
    kernel_ops: tuple[str, ...]
    kernel_quick: bool
    kernel_warmup: int
    kernel_iters: int
    moh_geometries: dict[str, tuple[int, int, int]]  # name → (Hq, Hkv, D)
    moh_batches: tuple[int, ...]
    moh_lengths: tuple[int, ...]
    moh_fractions: tuple[float, ...]
    budget_s: float
    caps_s: dict[str, float]  # per-section ceilings
    reserve_s: dict[str, float]  # seconds a section leaves to the sections after it
    pytest_paths: tuple[str, ...]


FULL = Profile(
    name="full", device="cuda", dtype="bfloat16", geometry="llava-1.5-7b", batches=(1, 8, 32),
    keep_counts=(288, 144, 64), pool_factors=(2, 3), layer=2, new_tokens=(32, 128), text_tokens=64,
    warmup=1, repeats_prefill=5, repeats_e2e=2, attns=("sdpa", "flash_attention_2"),
    kernel_ops=("row_probs", "compact", "biased", "head_sparse"), kernel_quick=False, kernel_warmup=3,
    kernel_iters=15, moh_geometries={"llava-1.5-7b": (32, 32, 128), "qwen2.5-vl-7b": (28, 4, 128)},
    moh_batches=(1, 32), moh_lengths=(4096, 16384), moh_fractions=(0.125, 0.25, 0.5, 0.75, 1.0),
    budget_s=570.0, caps_s={"pytest_gpu": 150.0, "kernels": 100.0, "llava": 330.0, "moh": 45.0},
    reserve_s={"llava": 40.0},
    pytest_paths=("tests/test_flash_route.py", "tests/kernels"),  # flash first: the kernel tests compile a lot
)  # fmt: skip

DRY = Profile(
    name="dry-run", device="cpu", dtype="float32", geometry="tiny", batches=(1, 2), keep_counts=(8, 4, 2),
    pool_factors=(2,), layer=2, new_tokens=(2, 3), text_tokens=8, warmup=0, repeats_prefill=1, repeats_e2e=1,
    attns=("sdpa", "flash_attention_2"), kernel_ops=("row_probs", "compact", "biased", "head_sparse"),
    kernel_quick=True, kernel_warmup=0, kernel_iters=1,
    moh_geometries={"llava-1.5-7b": (4, 4, 16), "qwen2.5-vl-7b": (4, 2, 16)}, moh_batches=(1, 2),
    moh_lengths=(64, 128), moh_fractions=(0.5, 1.0), budget_s=300.0,
    caps_s={"pytest_gpu": 120.0, "kernels": 60.0, "llava": 120.0, "moh": 30.0},
    reserve_s={"llava": 5.0},
    pytest_paths=("tests/kernels/test_kernels_gpu.py",),  # the lightest gpu-marked file: plumbing only
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ context
@dataclass
class Context:
    profile: Profile
    out: Path
    dry_run: bool
    force: bool
    start: float = field(default_factory=time.perf_counter)
    model: Any = None  # the llava-geometry model, kept for the moh section's method timing
    argv: list[str] = field(default_factory=list)  # the command line, recorded in the meta

    @property
    def deadline(self) -> float:
        return self.start + self.profile.budget_s

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def section_path(self, name: str) -> Path:
        return self.out / "sections" / f"{name}.json"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # atomic: a cut run never leaves half a file


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _flash_unavailable_reason(device: str) -> str | None:
    """Why flash_attention_2 cannot run here (None: it can)."""
    if not device.startswith("cuda"):
        return "flash_attention_2 needs CUDA"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "the flash_attn package is not installed (pip install flash-attn)"
    return None


# ------------------------------------------------------------------------------------------------ env
def section_env(ctx: Context, cap: float) -> dict:
    cuda = torch.cuda.is_available()
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        commit = done.stdout.strip() or None
    return {
        "command": " ".join(["python", "benchmarks/gpu_suite.py", *ctx.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "cuda_available": cuda,
        "cuda_capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "triton": _version("triton"),
            "flash_attn": _version("flash-attn") or _version("flash_attn"),
            "vlm_accel": _version("vlm-accel"),
        },
        "git_commit": commit,
        "profile": asdict(ctx.profile),
    }


# ------------------------------------------------------------------------------------------------ pytest -m gpu
def _junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "tests": int(suite.get("tests", 0)),
        "failures": int(suite.get("failures", 0)),
        "errors": int(suite.get("errors", 0)),
        "skipped": int(suite.get("skipped", 0)),
        "passed": int(suite.get("tests", 0))
        - int(suite.get("failures", 0))
        - int(suite.get("errors", 0))
        - int(suite.get("skipped", 0)),
        "failed_tests": failed[:50],
    }


def section_pytest_gpu(ctx: Context, cap: float) -> dict:
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    junit = logs / "pytest_gpu.xml"
    junit.unlink(missing_ok=True)
    args = ["-m", "gpu", "-v", "-p", "no:cacheprovider", "-o", "addopts=", *ctx.profile.pytest_paths,
            f"--junitxml={junit}"]  # fmt: skip
    command = "python -m pytest " + " ".join(args)
    if ctx.dry_run:
        # in-process: the interpreter already has torch and transformers imported (a fresh one costs ~15 s);
        # on CPU every gpu test skips, which is what the dry-run checks (collection and the junit plumbing)
        import pytest

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = pytest.main([str(ROOT / a) if a in ctx.profile.pytest_paths else a for a in args])
        (logs / "pytest_gpu.txt").write_text(buffer.getvalue())
        result = {"command": command, "exit_code": int(code), "in_process": True}
    else:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True, timeout=cap
            )
        except subprocess.TimeoutExpired as err:
            text = _text(err.stdout) + _text(err.stderr)
            (logs / "pytest_gpu.txt").write_text(text)
            # no junit report from a killed run: count the verbose per-test lines it printed so far
            counts = {
                o.lower(): len(re.findall(rf"::\S+ {o}", text))
                for o in ("PASSED", "FAILED", "SKIPPED", "ERROR")
            }
            failed = re.findall(r"(\S+::\S+) (?:FAILED|ERROR)", text)[:50]
            return {"status": "timeout", "reason": f"pytest -m gpu ran past {cap:.0f} s", "command": command,
                    "exit_code": None, "passed": counts["passed"], "failures": counts["failed"],
                    "errors": counts["error"], "skipped": counts["skipped"], "failed_tests": failed,
                    "tests": sum(counts.values())}  # fmt: skip
        (logs / "pytest_gpu.txt").write_text(done.stdout + done.stderr)
        result = {"command": command, "exit_code": done.returncode, "in_process": False}
    if not junit.exists():
        raise RuntimeError(
            f"pytest wrote no junit report (exit code {result['exit_code']}); see logs/pytest_gpu.txt"
        )
    result.update(_junit_counts(junit))
    return result


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


# ------------------------------------------------------------------------------------------------ kernels
def _kernel_bench_module():
    """benchmarks/kernels.py, imported by path (``kernels`` is also the name of a Hugging Face package)."""
    spec = importlib.util.spec_from_file_location(
        "vlm_accel_kernel_bench", ROOT / "benchmarks" / "kernels.py"
    )
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def section_kernels(ctx: Context, cap: float) -> dict:
    from vlm_accel.kernels import interpreter_active, triton_available

    kb = _kernel_bench_module()
    p = ctx.profile
    dev = torch.device(p.device)
    if dev.type == "cuda":
        reference_only = not triton_available()
        note = "triton not installed: torch references only" if reference_only else ""
    else:
        reference_only = not (interpreter_active() and triton_available())
        note = (
            "CPU: torch references only (Triton compiles for CUDA)" if reference_only else "CPU interpreter"
        )
    args = argparse.Namespace(warmup=p.kernel_warmup, iters=p.kernel_iters, reference_only=reference_only)
    dtype = getattr(torch, p.dtype if dev.type == "cuda" else "float32")
    torch.manual_seed(0)
    peaks = kb.measure_device(dev)
    rows: list = []
    ops: dict[str, str] = {}
    deadline = time.perf_counter() + cap
    log = io.StringIO()
    for op in p.kernel_ops:
        path = ctx.out / "sections" / "kernels" / f"{op}.json"
        saved = None if ctx.force else _read_json(path)
        if saved is not None:
            rows += saved
            ops[op] = f"done (resumed): {len(saved)} rows"
            continue
        if time.perf_counter() > deadline:
            ops[op] = "skipped: section budget spent"
            continue
        new: list = []
        try:
            with contextlib.redirect_stdout(log), torch.inference_mode():
                kb.SWEEPS[op](dev, dtype, peaks, args, new, p.kernel_quick)
        except Exception as err:  # one broken sweep must not cost the others
            ops[op] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        new = [asdict(r) for r in new]
        _write_json(path, new)
        rows += new
        ops[op] = f"done: {len(new)} rows"
    (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
    with (ctx.out / "logs" / "kernels.txt").open("a") as f:
        f.write(log.getvalue())
    result = {"peaks": peaks, "dtype": str(dtype), "note": note, "ops": ops, "rows": rows,
              "decisions": kernel_decisions(rows)}  # fmt: skip
    missing = [op for op, status in ops.items() if not status.startswith("done")]
    if missing:
        result.update(status="partial", reason=f"sweeps not run: {', '.join(missing)}")
    return result


def kernel_decisions(rows: list[dict]) -> dict:
    """Per op: where Triton beats the torch reference (the numbers decide the default: Triton only where it wins)."""
    baseline = {"row_probs": "torch", "compact_kv": "torch_index_select", "biased_attn": "torch_float_mask",
                "head_sparse": "torch_sdpa_gate"}  # fmt: skip
    out = {}
    for op, ref in baseline.items():
        pairs = []
        for row in rows:
            if row["op"] != op or row["impl"] != "triton" or row["ms"] is None:
                continue
            base = next(
                (r for r in rows if r["op"] == op and r["impl"] == ref and r["params"] == row["params"]), None
            )
            if base is not None and base["ms"]:
                pairs.append((row["params"], base["ms"] / row["ms"]))
        if not pairs:
            out[op] = {"points": 0, "verdict": "not timed (no Triton rows)"}
            continue
        wins = [s for _, s in pairs if s > 1.0]
        out[op] = {
            "points": len(pairs),
            "triton_wins": len(wins),
            "median_speedup": statistics.median(s for _, s in pairs),
            "min_speedup": min(s for _, s in pairs),
            "verdict": "Triton wins everywhere measured" if len(wins) == len(pairs)
            else "Triton loses somewhere: keep the torch default there" if wins else "torch reference wins: keep it",
        }  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ llava geometry
def _arms(p: Profile, n_visual: int):
    """(every arm, headline arms): unpatched, a no-op patch, fastv / random at each keep count, pool."""
    from vlm_accel.eval.bench import Arm, parse_method_spec

    def arm(spec: str, label: str) -> Arm:
        made = parse_method_spec(spec)
        made.label = label
        return made

    arms = [Arm("unpatched"), arm(f"fastv:layer={p.layer},keep_ratio=1.0", "no-op (fastv keep 100 %)")]
    for k in p.keep_counts:
        for method in ("fastv", "random"):
            arms.append(arm(f"{method}:layer={p.layer},keep_count={k}", f"{method} {k}/{n_visual}"))
    for f in p.pool_factors:
        side = math.isqrt(n_visual)
        arms.append(
            arm(f"pool:layer={p.layer},factor={f}", f"pool {f}x{f} ({math.ceil(side / f) ** 2}/{n_visual})")
        )
    k = min(p.keep_counts)
    headline = {"unpatched", f"fastv {k}/{n_visual}", f"random {k}/{n_visual}"}
    return arms, [a for a in arms if a.label in headline]


def _units(p: Profile, arms: list, headline: list) -> list[tuple[str, str, int, list]]:
    """Measurement units in priority order: (attn, kind, batch, arms); kind is 'prefill' or 'e2e<N>'."""
    short, long = p.new_tokens
    units = []
    for attn in p.attns:
        units += [(attn, "prefill", b, arms) for b in p.batches]
        units += [(attn, f"e2e{short}", b, arms if attn == "sdpa" else headline) for b in p.batches]
        if attn == "sdpa":
            units += [(attn, f"e2e{long}", b, headline) for b in p.batches]
    return units


def _measure_unit(model, attn: str, kind: str, batch: int, arms: list, p: Profile) -> dict:
    """Interleaved timings of ``arms`` (warm-up discarded, medians); prefill units add each arm's token counts,
    KV bytes and FLOPs (one untimed prefill each)."""
    from vlm_accel.eval import bench

    dtype = bench.parse_dtype(p.dtype)
    inputs = bench.synthetic_inputs(model.config, batch, p.text_tokens, p.device, dtype)
    repeats = p.repeats_prefill if kind == "prefill" else p.repeats_e2e
    runs: dict[str, list[float]] = {a.label: [] for a in arms}
    mems: dict[str, list] = {a.label: [] for a in arms}
    vision: list[float] = []
    warmup = p.warmup
    if kind != "prefill" and p.warmup:
        with bench.applied(model, arms[0]):  # compile / allocate the decode path at this batch size once
            bench.time_generate(model, inputs, p.device, 2)
        warmup = 0
    for rep in range(warmup + repeats):
        measured = rep >= warmup
        if kind == "prefill":
            clock = bench.time_vision(model, inputs, p.device)
            if measured:
                vision.append(clock.wall)
        for arm in arms:
            with bench.applied(model, arm):
                if kind == "prefill":
                    clock, _ = bench.time_prefill(model, inputs, p.device)
                    mem = None
                else:
                    clock, mem = bench.time_generate(model, inputs, p.device, int(kind[3:]))
            if measured:
                runs[arm.label].append(clock.wall)
                mems[arm.label].append(mem)
    rows = []
    settings = bench.BenchSettings(model=p.geometry, device=p.device, dtype=p.dtype, attn=attn)
    for arm in arms:
        row = {"arm": arm.label, "attn": attn, "kind": kind, "batch": batch,
               "median_s": statistics.median(runs[arm.label]), "runs_s": runs[arm.label]}  # fmt: skip
        peaks = [m for m in mems[arm.label] if m is not None]
        row["peak_mem_bytes"] = max(peaks) if peaks else None
        if kind == "prefill":
            row["vision_s"] = statistics.median(vision)
            static = bench._static_row(model, arm, batch, inputs, settings)
            row.update({k: static[k] for k in ("method_config", "seq_len", "visual_tokens", "visual_tokens_kept",
                                               "tokens_per_layer", "kv_length_per_layer", "kv_bytes",
                                               "prefill_flops", "time_in_patch_s")})  # fmt: skip
        rows.append(row)
    return {"attn": attn, "kind": kind, "batch": batch, "rows": rows}


def _set_text_attn(model, attn: str) -> None:
    current = model.config.get_text_config()._attn_implementation
    if current != attn:
        model.set_attn_implementation({"text_config": attn})


def section_llava(ctx: Context, cap: float) -> dict:
    from vlm_accel.eval import bench

    p = ctx.profile
    deadline = time.perf_counter() + cap
    unit_dir = ctx.out / "sections" / "llava"
    config = bench.geometry_config(p.geometry)
    n_visual = bench.visual_tokens_per_image(config)
    arms, headline = _arms(p, n_visual)
    flash_reason = _flash_unavailable_reason(p.device)
    units, statuses = [], {}
    model = None
    build_s = None
    for attn, kind, batch, unit_arms in _units(p, arms, headline):
        name = f"{attn}-{kind}-b{batch}"
        path = unit_dir / f"{name}.json"
        saved = None if ctx.force else _read_json(path)
        if saved is not None:
            units.append(saved)
            statuses[name] = "done (resumed)"
            continue
        if attn.startswith("flash") and flash_reason:
            statuses[name] = f"skipped: {flash_reason}"
            continue
        if time.perf_counter() > deadline:
            statuses[name] = "skipped: section budget spent"
            continue
        try:
            if model is None:
                start = time.perf_counter()
                model, _ = bench.load_model(p.geometry, p.device, bench.parse_dtype(p.dtype), "sdpa")
                build_s = time.perf_counter() - start
                ctx.model = model
            _set_text_attn(model, attn)
            with torch.inference_mode():
                unit = _measure_unit(model, attn, kind, batch, unit_arms, p)
        except Exception as err:  # an OOM at batch 32 must not cost the other units
            statuses[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            if p.device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        _write_json(path, unit)
        units.append(unit)
        statuses[name] = "done"
    if model is not None:
        _set_text_attn(model, "sdpa")
    rows = assemble_llava_rows(units, config, p)
    result = {"geometry": p.geometry, "description": bench.GEOMETRIES[p.geometry].description,
              "visual_tokens_per_image": n_visual, "pruning_layer": p.layer, "new_tokens": list(p.new_tokens),
              "model_build_s": build_s, "units": statuses, "rows": rows}  # fmt: skip
    redo = [name for name, s in statuses.items() if s.startswith(("failed", "skipped: section budget"))]
    if redo:
        result.update(
            status="partial", reason=f"{len(redo)} units cut by the budget or failed (a rerun measures them)"
        )
    return result


def _e2e_flops(geometry, row: dict, new_tokens: int) -> int:
    """Analytic LM FLOPs of a generate() call: the prefill, then ``new_tokens - 1`` decode steps over caches that
    grow by one token per step from each layer's post-prefill length."""
    from vlm_accel.eval.flops import decode_step_flops

    kv = row["kv_length_per_layer"]
    steps = sum(
        decode_step_flops(geometry, [n + 1 + i for n in kv], row["batch"]) for i in range(new_tokens - 1)
    )
    return row["prefill_flops"] + steps


def assemble_llava_rows(units: list[dict], config, p: Profile) -> list[dict]:
    """One row per (attn, batch, arm) with prefill / e2e times and their ratios over the unpatched arm of the same
    attention backend and batch size, the FLOPs-ideal ratios and the share of the ideal reached."""
    from vlm_accel.eval.flops import TextGeometry

    geometry = TextGeometry.from_config(config)
    short, long = p.new_tokens
    merged: dict[tuple, dict] = {}
    static: dict[tuple, dict] = {}  # token counts / FLOPs do not depend on the attention backend
    for unit in units:
        for r in unit["rows"]:
            row = merged.setdefault((r["attn"], r["batch"], r["arm"]), {"attn": r["attn"], "batch": r["batch"],
                                                                          "arm": r["arm"]})  # fmt: skip
            if r["kind"] == "prefill":
                row.update(prefill_s=r["median_s"], prefill_s_runs=r["runs_s"], vision_s=r["vision_s"])
                keys = ("method_config", "seq_len", "visual_tokens", "visual_tokens_kept", "tokens_per_layer",
                        "kv_length_per_layer", "kv_bytes", "prefill_flops", "time_in_patch_s")  # fmt: skip
                static[(r["batch"], r["arm"])] = {k: r[k] for k in keys}
            else:
                n = int(r["kind"][3:])
                suffix = "" if n == short else f"_{n}"
                row.update({f"e2e{suffix}_s": r["median_s"], f"e2e{suffix}_s_runs": r["runs_s"],
                            f"peak_mem{suffix}_bytes": r["peak_mem_bytes"]})  # fmt: skip
    for (_, batch, arm), row in merged.items():
        row.update(static.get((batch, arm), {}))
    for row in merged.values():
        base = merged.get((row["attn"], row["batch"], "unpatched"))
        if base is None:
            continue
        if "prefill_flops" in row and "prefill_flops" in base:
            row["flops_ideal_speedup"] = base["prefill_flops"] / row["prefill_flops"]
            row["kv_fraction"] = row["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] else None
            for n, suffix in ((short, ""), (long, f"_{long}")):
                row[f"e2e{suffix}_flops_ideal_speedup"] = _e2e_flops(geometry, base, n) / _e2e_flops(
                    geometry, row, n
                )
        if row.get("prefill_s") and base.get("prefill_s"):
            row["prefill_speedup"] = base["prefill_s"] / row["prefill_s"]
            if row.get("flops_ideal_speedup"):
                row["prefill_share_of_ideal"] = row["prefill_speedup"] / row["flops_ideal_speedup"]
            row["overhead_pct_of_prefill"] = 100 * (row["prefill_s"] / base["prefill_s"] - 1)
        for n, suffix in ((short, ""), (long, f"_{long}")):
            if row.get(f"e2e{suffix}_s") and base.get(f"e2e{suffix}_s"):
                row[f"e2e{suffix}_speedup"] = base[f"e2e{suffix}_s"] / row[f"e2e{suffix}_s"]
                row[f"throughput{suffix}_tok_s"] = row["batch"] * n / row[f"e2e{suffix}_s"]
                ideal = row.get(f"e2e{suffix}_flops_ideal_speedup")
                if ideal:
                    row[f"e2e{suffix}_share_of_ideal"] = row[f"e2e{suffix}_speedup"] / ideal
    return sorted(merged.values(), key=lambda r: (p.attns.index(r["attn"]), r["batch"]))


# ------------------------------------------------------------------------------------------------ moh
def section_moh(ctx: Context, cap: float) -> dict:
    import torch.nn.functional as F

    from vlm_accel import list_methods
    from vlm_accel.kernels import head_sparse_decode_attention
    from vlm_accel.kernels._dispatch import triton_runs_on

    kb = _kernel_bench_module()
    p = ctx.profile
    dev = torch.device(p.device)
    dtype = getattr(torch, p.dtype)
    use_triton = triton_runs_on(dev, True)
    warmup, iters = max(1, p.kernel_warmup), max(3, p.kernel_iters)
    deadline = time.perf_counter() + cap
    rows, skipped = [], []
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.inference_mode():
        for geo, (hq, hkv, d) in p.moh_geometries.items():
            for b in p.moh_batches:
                for n in p.moh_lengths:
                    if time.perf_counter() > deadline:
                        skipped.append(f"{geo} B={b} N={n}: section budget spent")
                        continue
                    q = torch.randn(b, hq, 1, d, device=dev, dtype=dtype, generator=g)
                    k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, generator=g)
                    v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, generator=g)
                    dense_ms, _ = kb.time_call(
                        lambda q=q, k=k, v=v, gqa=hkv != hq: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
                        dev, warmup, iters,
                    )  # fmt: skip
                    for frac in p.moh_fractions:
                        active = max(1, round(frac * hkv))
                        groups = torch.zeros(b, hkv, dtype=torch.bool, device=dev)
                        groups[:, :active] = True
                        head_mask = groups.repeat_interleave(
                            hq // hkv, dim=1
                        )  # routing at KV-group granularity
                        row = {"geometry": geo, "batch": b, "cached_tokens": n, "active_kv_groups": active,
                               "kv_groups": hkv, "active_fraction": active / hkv, "dense_sdpa_ms": dense_ms}  # fmt: skip
                        for impl, tri in (("reference", False), ("triton", True)):
                            if tri and not use_triton:
                                row["triton_ms"] = None
                                continue
                            ms, _ = kb.time_call(
                                lambda hm=head_mask, q=q, k=k, v=v, tri=tri: head_sparse_decode_attention(
                                    q, k, v, hm, use_triton=tri
                                ),
                                dev, warmup, iters,
                            )  # fmt: skip
                            row[f"{impl}_ms"] = ms
                        if row["triton_ms"]:
                            row["speedup_vs_dense"] = dense_ms / row["triton_ms"]
                        rows.append(row)
                    del q, k, v
    result = {"kernel": "vlm_accel.kernels.head_sparse_decode_attention",
              "baseline": "F.scaled_dot_product_attention over all heads (the unpatched decode attention)",
              "triton_timed": use_triton, "rows": rows, "skipped": skipped}  # fmt: skip
    if not use_triton:
        result["note"] = (
            "Triton not runnable on this device: reference path only, no head-sparse speedup measured"
        )
    result["moh_method"] = _moh_method_timing(ctx) if "moh" in list_methods() else "moh method not registered"
    return result


def _moh_method_timing(ctx: Context) -> dict | str:
    """A decode-heavy generate() with the registered ``moh`` method (its example config) vs unpatched."""
    from vlm_accel.eval import bench
    from vlm_accel.registry import get_method_class

    p = ctx.profile
    model = ctx.model
    if model is None:
        model, _ = bench.load_model(p.geometry, p.device, bench.parse_dtype(p.dtype), "sdpa")
        ctx.model = model
    try:
        config = get_method_class("moh").example_config()
    except Exception as err:
        return f"moh example config unavailable: {type(err).__name__}: {err}"
    arms = [bench.Arm("unpatched"), bench.Arm("moh (example config)", [config])]
    result = {}
    for batch in (1, max(p.batches)):
        inputs = bench.synthetic_inputs(
            model.config, batch, p.text_tokens, p.device, bench.parse_dtype(p.dtype)
        )
        times: dict[str, list[float]] = {a.label: [] for a in arms}
        try:
            for rep in range(1 + p.repeats_e2e):
                for arm in arms:
                    with bench.applied(model, arm):
                        clock, _ = bench.time_generate(model, inputs, p.device, p.new_tokens[0])
                    if rep:
                        times[arm.label].append(clock.wall)
        except Exception as err:
            result[f"batch {batch}"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            continue
        medians = {k: statistics.median(v) for k, v in times.items()}
        result[f"batch {batch}"] = {"e2e_s": medians, "new_tokens": p.new_tokens[0],
                                    "speedup": medians["unpatched"] / medians["moh (example config)"]}  # fmt: skip
    return result


# ------------------------------------------------------------------------------------------------ targets
def evaluate_targets(sections: dict, p: Profile) -> list[dict]:
    """The issue's targets against what was measured (None = not measured); never a pass without a number."""
    short = p.new_tokens[0]
    llava = (sections.get("llava") or {}).get("data") or {}
    rows = [r for r in llava.get("rows", []) if r["attn"] == "sdpa"]
    n_visual = llava.get("visual_tokens_per_image")
    k = min(p.keep_counts)
    headline = next((r for r in rows if r["batch"] == 1 and r["arm"] == f"fastv {k}/{n_visual}"), {})
    noop = next((r for r in rows if r["batch"] == 1 and r["arm"].startswith("no-op")), {})
    big = max(p.batches)
    at_big = [r for r in rows if r["batch"] == big and r["arm"] != "unpatched" and r.get("e2e_speedup")]
    kernels = ((sections.get("kernels") or {}).get("data") or {}).get("rows", [])
    rp = []
    for r in kernels:
        if r["op"] == "row_probs" and r["impl"] == "triton" and r["ms"] and r["params"].get("M", 0) >= 64:
            base = next((x for x in kernels if x["op"] == "row_probs" and x["impl"] == "torch"
                         and x["params"] == r["params"] and x["ms"]), None)  # fmt: skip
            if base:
                rp.append(base["ms"] / r["ms"])
    moh = ((sections.get("moh") or {}).get("data") or {}).get("rows", [])
    half = [
        r["speedup_vs_dense"]
        for r in moh
        if r.get("speedup_vs_dense") and abs(r["active_fraction"] - 0.5) < 1e-9
    ]

    def target(name: str, value: float | None, goal: float, better: str = "higher", unit: str = "×") -> dict:
        met = None if value is None else (value >= goal if better == "higher" else value <= goal)
        return {"target": name, "goal": f"{'≥' if better == 'higher' else '≤'} {goal:g}{unit}", "measured": value,
                "unit": unit, "met": met}  # fmt: skip

    label = f"fastv {k}/{n_visual} after layer {p.layer}, batch 1, sdpa"
    return [
        target(f"prefill speedup, {label}", headline.get("prefill_speedup"), 3.2),
        target(f"prefill share of FLOPs-ideal, {label}", headline.get("prefill_share_of_ideal"), 0.9, unit=""),
        target(f"end-to-end speedup ({short} new tokens), {label}", headline.get("e2e_speedup"), 1.3),
        target(f"end-to-end share of FLOPs-ideal, {label}", headline.get("e2e_share_of_ideal"), 0.9, unit=""),
        target("no-op patch overhead, % of prefill (batch 1, sdpa)", noop.get("overhead_pct_of_prefill"), 2.0,
               better="lower", unit=" %"),
        target(f"worst patched/unpatched throughput at batch {big} (e2e {short} tokens)",
               min((r["e2e_speedup"] for r in at_big), default=None), 1.0),
        target("Triton row-probs vs torch at ≥ 64 rows (worst point)", min(rp, default=None), 2.0),
        target("head-sparse decode vs all heads at 50 % active KV groups (worst point)", min(half, default=None), 1.7),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def _table(headers: list[str], lines: list[list[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    return [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(x) + " |" for x in lines),
    ]


def render_markdown(suite: dict) -> str:
    meta = suite["meta"]
    p = suite["profile"]
    v = meta.get("versions", {})
    out = [
        f"# GPU suite ({p['name']})",
        "",
        f"- device: **{meta.get('device_name')}**; dtype {p['dtype']}; date {meta.get('date')}",
        f"- versions: torch {v.get('torch')}, transformers {v.get('transformers')}, triton {v.get('triton')}, "
        f"flash-attn {v.get('flash_attn')}; git {meta.get('git_commit')}",
        f"- command: `{meta.get('command')}`",
    ]
    if p["name"] != "full":
        out.append("- **dry run at tiny sizes on CPU: plumbing check, not a result**")
    out += ["", "## Sections", ""]
    out += _table(["section", "status", "seconds", "reason"], [
        [name, s["status"], _fmt(s.get("seconds"), ".1f"), s.get("reason") or ""]
        for name, s in suite["sections"].items()
    ])  # fmt: skip
    out += ["", f"## Targets ({p['geometry']} geometry, {p['dtype']}, sdpa)", ""]
    out += _table(["target", "goal", "measured", "met"], [
        [t["target"], t["goal"], _fmt(t["measured"], ".3g"), {True: "yes", False: "**no**", None: "not measured"}[t["met"]]]
        for t in suite["targets"]
    ])  # fmt: skip
    pt = (suite["sections"].get("pytest_gpu") or {}).get("data")
    if pt:
        out += ["", "## pytest -m gpu", "", f"`{pt['command']}`: {pt['passed']} passed, {pt['failures']} failed, "
                f"{pt['errors']} errors, {pt['skipped']} skipped (exit code {pt['exit_code']})"]  # fmt: skip
        out += [f"- FAILED {name}" for name in pt.get("failed_tests", [])]
    llava = (suite["sections"].get("llava") or {}).get("data")
    if llava and llava.get("rows"):
        short, long = llava["new_tokens"]
        out += ["", f"## {llava['geometry']}: {llava['description']}", "",
                f"Pruning after layer {llava['pruning_layer']}; ratios over the unpatched arm of the same backend and "
                f"batch; FLOPs-ideal = analytic LM FLOPs ratio; share = measured / ideal; model build "
                f"{_fmt(llava.get('model_build_s'), '.1f')} s.", ""]  # fmt: skip
        for attn in dict.fromkeys(r["attn"] for r in llava["rows"]):
            out += [f"### {attn}", ""]
            out += _table(
                ["arm", "batch", "vis kept", "prefill ms", "prefill ×", "ideal ×", "share", f"e2e{short} ms",
                 f"e2e{short} ×", "e2e ideal ×", f"e2e{long} ×", "tok/s", "KV frac", "patch ms"],
                [[r["arm"], str(r["batch"]), f"{r.get('visual_tokens_kept', '—')}/{r.get('visual_tokens', '—')}",
                  _fmt(r.get("prefill_s"), ".1f", 1e3), _fmt(r.get("prefill_speedup")),
                  _fmt(r.get("flops_ideal_speedup")), _fmt(r.get("prefill_share_of_ideal")),
                  _fmt(r.get("e2e_s"), ".0f", 1e3), _fmt(r.get("e2e_speedup")),
                  _fmt(r.get("e2e_flops_ideal_speedup")), _fmt(r.get(f"e2e_{long}_speedup")),
                  _fmt(r.get("throughput_tok_s"), ".1f"), _fmt(r.get("kv_fraction"), ".3f"),
                  _fmt(r.get("time_in_patch_s"), ".2f", 1e3)]
                 for r in llava["rows"] if r["attn"] == attn],
            )  # fmt: skip
            out.append("")
        not_done = {k: s for k, s in llava["units"].items() if not s.startswith("done")}
        if not_done:
            out += ["Units not measured:", *(f"- {k}: {s}" for k, s in not_done.items())]
    kern = (suite["sections"].get("kernels") or {}).get("data")
    if kern:
        out += ["", "## Kernels (Triton vs torch reference vs floor)", "",
                f"Device floors: copy {kern['peaks']['bandwidth'] / 1e9:.0f} GB/s, matmul "
                f"{kern['peaks']['flops'] / 1e12:.1f} TFLOP/s. {kern.get('note', '')}", ""]  # fmt: skip
        out += _table(["op", "points", "Triton wins", "median ×", "worst ×", "verdict"], [
            [op, str(d["points"]), str(d.get("triton_wins", "—")), _fmt(d.get("median_speedup")),
             _fmt(d.get("min_speedup")), d["verdict"]] for op, d in kern["decisions"].items()
        ])  # fmt: skip
        out += ["", *(f"- sweep {op}: {s}" for op, s in kern["ops"].items())]
        out += ["", "Every point (ms; × vs the op's torch baseline; × vs floor):", ""]
        out += _table(["op", "impl", "params", "ms", "vs base", "vs floor"], [
            [r["op"], r["impl"], " ".join(f"{k}={v}" for k, v in r["params"].items()), _fmt(r["ms"], ".4f"),
             _fmt(r["vs_baseline"]), _fmt(r["vs_floor"])] for r in kern["rows"]
        ])  # fmt: skip
    moh = (suite["sections"].get("moh") or {}).get("data")
    if moh:
        out += ["", "## Head-sparse decode attention (MoH)", "", f"Baseline: {moh['baseline']}. {moh.get('note', '')}",
                ""]  # fmt: skip
        out += _table(["geometry", "batch", "cached", "active KV groups", "dense ms", "reference ms", "triton ms",
                       "× vs dense"], [
            [r["geometry"], str(r["batch"]), str(r["cached_tokens"]), f"{r['active_kv_groups']}/{r['kv_groups']}",
             _fmt(r["dense_sdpa_ms"], ".4f"), _fmt(r.get("reference_ms"), ".4f"), _fmt(r.get("triton_ms"), ".4f"),
             _fmt(r.get("speedup_vs_dense"))] for r in moh["rows"]
        ])  # fmt: skip
        method = moh.get("moh_method")
        out += ["", f"moh method: {json.dumps(method) if not isinstance(method, str) else method}"]
    plots = suite.get("plots") or []
    if plots:
        out += ["", "## Plots", "", *(f"![{Path(x).stem}]({x})" for x in plots)]
    return "\n".join(out) + "\n"


def make_plots(suite: dict, out: Path) -> list[str]:
    """The llava speed plot per backend (vlm_accel.eval.plots.speed_plot) and the MoH fraction plot."""
    from vlm_accel.eval.plots import _pyplot, speed_plot

    made = []
    llava = (suite["sections"].get("llava") or {}).get("data") or {}
    for attn in dict.fromkeys(r["attn"] for r in llava.get("rows", [])):
        rows = [r for r in llava["rows"] if r["attn"] == attn and r.get("prefill_speedup") is not None]
        if not any(r["arm"] != "unpatched" for r in rows):
            continue
        result = {"meta": {"settings": {"model": llava["geometry"], "dtype": suite["profile"]["dtype"],
                                        "device": suite["profile"]["device"],
                                        "attn": attn}, "device_name": suite["meta"].get("device_name")},
                  "rows": rows}  # fmt: skip
        with contextlib.suppress(Exception):  # a plot must never cost the numbers
            made.append(str(speed_plot(result, out / "plots" / f"llava-{attn}.png").relative_to(out)))
    moh = (suite["sections"].get("moh") or {}).get("data") or {}
    series: dict[str, list] = {}
    for r in moh.get("rows", []):
        value = r.get("speedup_vs_dense") or (
            r["dense_sdpa_ms"] / r["reference_ms"] if r.get("reference_ms") else None
        )
        series.setdefault(f"{r['geometry']} B={r['batch']} N={r['cached_tokens']}", []).append(
            (r["active_fraction"], value)
        )
    if series:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in series.items():
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("active KV-group fraction")
        ax.set_ylabel("× vs all-heads SDPA" + ("" if moh.get("triton_timed") else " (reference path)"))
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / "plots" / "moh-decode.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path.relative_to(out)))
    return made


# ------------------------------------------------------------------------------------------------ driver
SECTIONS: dict[str, Callable[[Context, float], dict]] = {
    "env": section_env,
    "pytest_gpu": section_pytest_gpu,
    "kernels": section_kernels,
    "llava": section_llava,
    "moh": section_moh,
}


def _cap(ctx: Context, name: str) -> float:
    """Seconds section ``name`` may use: its ceiling, within what the budget has left after its reserve."""
    reserve = ctx.profile.reserve_s.get(name, 0.0)
    return max(0.0, min(ctx.profile.caps_s.get(name, ctx.profile.budget_s), ctx.remaining() - reserve))


def run_suite(ctx: Context, selected: list[str]) -> dict:
    sections: dict[str, dict] = {}
    for name in SECTION_ORDER:
        path = ctx.section_path(name)
        saved = _read_json(path)
        if name not in selected:
            if saved is not None:
                sections[name] = saved
            continue
        if saved is not None and saved.get("status") in FINISHED and not ctx.force and name != "env":
            saved["resumed"] = True
            sections[name] = saved
            print(f"[{name}] kept from a previous run ({saved['status']})")
            continue
        cap = _cap(ctx, name) if name != "env" else ctx.remaining()
        if cap <= 1.0:
            sections[name] = {"status": "skipped", "reason": "suite budget spent", "seconds": 0.0}
            _write_json(path, sections[name])
            continue
        print(f"[{name}] running (cap {cap:.0f} s)", flush=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            data = SECTIONS[name](ctx, cap)
            status = data.pop("status", "done") if isinstance(data, dict) else "done"
            reason = data.pop("reason", None) if isinstance(data, dict) else None
            entry = {"status": status, "reason": reason, "data": data}
        except Exception as err:
            entry = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        entry["seconds"] = time.perf_counter() - start
        entry["cpu_seconds"] = time.process_time() - cpu_start  # this process only (not a pytest subprocess)
        sections[name] = entry
        _write_json(path, entry)
        print(
            f"[{name}] {entry['status']} in {entry['seconds']:.1f} s {entry.get('reason') or ''}", flush=True
        )
    env = (sections.get("env") or {}).get("data") or {}
    suite = {"meta": env, "profile": asdict(ctx.profile), "sections": sections}
    suite["targets"] = evaluate_targets(sections, ctx.profile)
    suite["plots"] = make_plots(suite, ctx.out)
    _write_json(ctx.out / "suite.json", suite)
    (ctx.out / "summary.md").write_text(render_markdown(suite))
    return suite


def print_summary(suite: dict, out: Path) -> None:
    print(f"\nGPU suite ({suite['profile']['name']}) on {suite['meta'].get('device_name')} → {out}")
    for name, s in suite["sections"].items():
        print(f"  {name:11s} {s['status']:8s} {s.get('reason') or ''}")
    print("targets:")
    for t in suite["targets"]:
        verdict = {True: "met", False: "SHORT", None: "not measured"}[t["met"]]
        print(f"  {verdict:12s} {t['target']}: {_fmt(t['measured'], '.3g')} (goal {t['goal']})")
    print(f"wrote {out / 'suite.json'} and {out / 'summary.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (reused: finished parts are kept)"
    )
    parser.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on CPU")
    parser.add_argument(
        "--sections", default=",".join(SECTION_ORDER), help=f"comma list of {', '.join(SECTION_ORDER)}"
    )
    parser.add_argument("--force", action="store_true", help="redo sections / units already in --out")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget (default 570 s; dry 300 s)"
    )
    args = parser.parse_args(argv)
    selected = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(SECTION_ORDER))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTION_ORDER)}")
    if "env" not in selected:
        selected.insert(0, "env")
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: CUDA is not available (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). The GPU suite needs a CUDA build of torch, "
            "transformers and the GPU; install them (see docs/benchmarks.md) or run with --dry-run for the CPU "
            "plumbing check.",
            file=sys.stderr,
        )
        return 2
    profile = DRY if args.dry_run else FULL
    if args.budget_s is not None:
        profile = Profile(**{**asdict(profile), "budget_s": args.budget_s})
    args.out = args.out.resolve()  # the pytest subprocess runs from the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(profile=profile, out=args.out, dry_run=args.dry_run, force=args.force,
                  argv=list(sys.argv[1:] if argv is None else argv))  # fmt: skip
    if args.dry_run:
        torch.set_num_threads(1)
    suite = run_suite(ctx, selected)
    print_summary(suite, args.out)
    return 1 if any(s["status"] == "failed" for s in suite["sections"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
