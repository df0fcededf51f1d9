"""Data-parallel evaluation on accelerate: N processes, one patched model copy each, one merged results file.

lm-eval does the sharding itself: launched under ``accelerate launch`` / ``torchrun``, its ``HFLM`` (and so
``HFMultimodalLM`` and the ``vlm-accel`` model) builds an ``accelerate.Accelerator``, takes ``rank`` /
``world_size`` from it, gives rank r the documents r, r + N, r + 2N, … of every task, and gathers the per-sample
metrics on rank 0, which writes the results. What this module adds:

- **padding**: lm-eval evens out the ranks' request counts by appending copies of a rank's last request (the
  same ``Instance`` object again). Those copies are answered from the original instead of being generated, so
  they neither cost time nor enter the patch statistics;
- **merged statistics**: after the (single) ``generate_until`` call every rank makes, the ranks exchange their
  patch statistics (``torch.distributed.all_gather_object``); rank 0 records their merge (:func:`merge_stats`)
  with the per-process numbers alongside;
- **the launcher** behind ``vlm-accel eval --num-processes N`` (:func:`launch_command`): ``accelerate launch
  --multi_gpu`` when CUDA is present; on CPU, ``torchrun`` with ``ACCELERATE_USE_CPU=true`` so that accelerate
  sets up a gloo process group (``accelerate launch --cpu`` starts N CPU processes only through MPI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

# counters that add up over processes (the rest are recomputed, taken from rank 0, or kept per process)
SUMMED = (
    "generate_calls", "rows", "generate_time_s", "prefill_calls", "decode_calls", "forward_calls",
    "visual_tokens_seen", "visual_tokens_kept", "kv_bytes", "kv_bytes_unpatched", "time_in_patch_s",
)  # fmt: skip


def adopt_accelerator_ranks(lm: Any) -> None:
    """Give an lm-eval HF model the rank and world size of the accelerate run it was launched in.

    lm-eval 0.4.13's ``HFLM`` builds the ``Accelerator`` but takes rank / world size from it only when more than
    one GPU is visible, so on CPU (gloo) — or N processes sharing one GPU — every process would evaluate every
    document as rank 0. This sets them as it does in the multi-GPU case.
    """
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1 and lm.world_size == 1:
        lm._rank = accelerator.local_process_index
        lm._world_size = accelerator.num_processes
        lm._device = torch.device(str(accelerator.device))


def padding_sources(requests: Sequence[Any]) -> list[int | None]:
    """For each request, the index of the request it copies when it is lm-eval's rank padding, else None.

    lm-eval lists a request ``repeats`` times and pads a rank with further copies of its last request (the same
    object); an occurrence of an object beyond its ``repeats`` is therefore padding.
    """
    first: dict[int, int] = {}
    seen: dict[int, int] = {}
    sources: list[int | None] = []
    for i, request in enumerate(requests):
        key = id(request)
        first.setdefault(key, i)
        seen[key] = seen.get(key, 0) + 1
        sources.append(first[key] if seen[key] > int(getattr(request, "repeats", 1) or 1) else None)
    return sources


def generate_without_padding(
    generate: Callable[..., list[str]], requests: Sequence[Any], disable_tqdm: bool = False
) -> list[str]:
    """``generate(requests)`` with lm-eval's padding copies answered from their originals (not generated)."""
    sources = padding_sources(requests)
    real = [r for r, s in zip(requests, sources) if s is None]
    answers = iter(generate(real, disable_tqdm=disable_tqdm))
    out: list[str] = []
    for source in sources:
        out.append(next(answers) if source is None else out[source])
    return out


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (``[obj]`` when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def merge_stats(per_process: list[dict[str, Any]]) -> dict[str, Any]:
    """One stats dict from each process's (``RunStats.as_dict``): counters summed, fractions recomputed from the
    sums; the last prefill's tokens per layer and each method's own counters are rank 0's; ``per_process`` keeps
    every process's numbers."""
    if len(per_process) == 1:
        return per_process[0]
    merged = dict(per_process[0])
    for key in SUMMED:
        if key in merged:
            merged[key] = sum(p.get(key, 0) for p in per_process)
    for key in ("generate_time_s", "time_in_patch_s"):
        if key in merged:
            merged[key] = round(merged[key], 4)
    if "visual_tokens_seen" in merged:
        seen = merged["visual_tokens_seen"]
        merged["visual_keep_fraction"] = merged["visual_tokens_kept"] / seen if seen else 1.0
    if "kv_bytes_unpatched" in merged:
        full = merged["kv_bytes_unpatched"]
        merged["kv_bytes_fraction"] = merged["kv_bytes"] / full if full else 1.0
    merged["processes"] = len(per_process)
    merged["per_process"] = per_process
    return merged


# ---------------------------------------------------------------------------------------------- launching


def launch_command(
    num_processes: int, argv: Sequence[str], cuda: bool | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command (and environment) that runs ``vlm-accel eval ARGV`` in ``num_processes`` processes."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"--num-processes must be a positive integer, got {num_processes!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    module = ["-m", "vlm_accel.eval.lm_eval_cli", *argv]
    if cuda:
        if num_processes > torch.cuda.device_count() > 0:
            raise ValueError(
                f"--num-processes {num_processes} > {torch.cuda.device_count()} visible CUDA devices "
                "(one process per device)"
            )
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]  # fmt: skip
        return [*launcher, *module], env
    env["ACCELERATE_USE_CPU"] = "true"  # accelerate's Accelerator then runs a gloo process group on CPU
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)]
    return [*launcher, *module], env


def pop_num_processes(argv: Sequence[str]) -> tuple[int, list[str]]:
    """``(N, the other arguments)`` from ``--num-processes N`` / ``--num-processes=N`` (N = 1 when absent)."""
    rest: list[str] = []
    number: str | None = None
    args = iter(argv)
    for arg in args:
        if arg == "--num-processes":
            number = next(args, None)
            if number is None:
                raise ValueError("--num-processes needs a value")
        elif arg.startswith("--num-processes="):
            number = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if number is None:
        return 1, rest
    try:
        value = int(number)
    except ValueError:
        raise ValueError(f"--num-processes must be a positive integer, got {number!r}") from None
    if value < 1:
        raise ValueError(f"--num-processes must be a positive integer, got {number!r}")
    return value, rest


def launch(num_processes: int, argv: Sequence[str]) -> int:
    """Run ``vlm-accel eval ARGV`` in ``num_processes`` data-parallel processes; their exit status."""
    cmd, env = launch_command(num_processes, argv)
    return subprocess.run(cmd, env=env).returncode
