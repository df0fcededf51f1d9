"""TTF on the testbed: accuracy on noisy frame streams and the compute-saving clip mode, against the unpatched model.

Data: :func:`vlm_accel.testbed.frames.make_noisy_frame_dataset` — a static scene in which one object moves one cell per
frame, each frame with its own sensor noise / flicker / jitter (``NOISE_LEVELS``), and a question about the last
frame. Fresh seed (default 20261202); the testbed models never saw these frames.

* **stream** (what the testbed fits: one image per prompt): every item is a stream (one row of a batch), frame ``t``
  per call inside ``patch.stream()``; the answer of the last call is scored. Arms: unpatched, ``ttf`` (README
  defaults), ``ttf`` at the code's ``pixel_threshold=0.1``, and ``ttf(save_compute)``.
* **clip** (several images in one prompt — out of the testbed's training distribution): all ``T`` frames in one
  prompt, question about the last; arms: unpatched and ``ttf(save_compute)`` with ``clip_keep="reused"`` and
  ``"latest"``, one keyframe per clip; the share of visual tokens dropped from the LLM (from layer 1 on) and the
  prefill CPU-time ratios, timed interleaved in this run.

Run: ``OMP_NUM_THREADS=1 python benchmarks/ttf_testbed.py [--n 100] [--frames 5] [--levels 0 1 2 3 4] [--part both]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from vlm_accel.api import patch_model
from vlm_accel.methods.ttf import TTFConfig
from vlm_accel.testbed import load_model
from vlm_accel.testbed.dataset import make_frame_dataset
from vlm_accel.testbed.evaluate import normalize_answer
from vlm_accel.testbed.frames import NOISE_LEVELS, noisy_frames

STREAM_ARMS: dict[str, TTFConfig | None] = {
    "plain": None,
    "ttf": TTFConfig(),
    "ttf(tau=0.1)": TTFConfig(pixel_threshold=0.1),
    "ttf(tau=0.1, save_compute)": TTFConfig(pixel_threshold=0.1, save_compute=True),
}


def noisy_rows(clean: list[dict], level: int, seed: int) -> list[dict]:
    """The clean items with this level's per-frame noise (same noise stream at every level, scaled)."""
    noise = NOISE_LEVELS[level]
    return [dict(row, frames=noisy_frames(row["frames"], noise, (seed, 7, i))) for i, row in enumerate(clean)]


def messages(question: str, images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def encode(processor, rows: list[dict], frame: int | None) -> dict:
    """Inputs of one call: frame ``frame`` of each row (stream), or every frame in one prompt (clip, None)."""
    images_per_row = 1 if frame is not None else len(rows[0]["frames"])
    texts = [processor.apply_chat_template(messages(r["question"], images_per_row), add_generation_prompt=True)
             for r in rows]  # fmt: skip
    if frame is not None:
        images = [r["frames"][frame].convert("RGB") for r in rows]
    else:
        images = [f.convert("RGB") for r in rows for f in r["frames"]]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


@torch.no_grad()
def answer(model, processor, inputs: dict) -> list[str]:
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    return [normalize_answer(t) for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :],
                                                                 skip_special_tokens=True)]  # fmt: skip


@torch.no_grad()
def run_stream(model, processor, dataset, config: TTFConfig | None, batch: int) -> dict:
    correct, reused, patches = 0, 0, 0
    for start in range(0, len(dataset), batch):
        rows = dataset[start : start + batch]
        frames = len(rows[0]["frames"])
        with ExitStack() as stack:
            patch = stack.enter_context(patch_model(model, config)) if config is not None else None
            if patch is not None:
                stack.enter_context(patch.stream())
            for t in range(frames - 1):
                model(**encode(processor, rows, t))  # the policy's earlier steps (their prefill is what TTF reads)
            predictions = answer(model, processor, encode(processor, rows, frames - 1))
            if patch is not None:
                reused += patch.stats.methods["ttf"]["reused"]
                patches += patch.stats.methods["ttf"]["patches"]
        correct += sum(p == r["answer"] for p, r in zip(predictions, rows))
    return {"accuracy": correct / len(dataset), "reused_share": reused / patches if patches else None}


@torch.no_grad()
def run_clip(model, processor, dataset, config: TTFConfig | None, batch: int) -> dict:
    correct, seen, kept = 0, 0, 0
    for start in range(0, len(dataset), batch):
        rows = dataset[start : start + batch]
        inputs = encode(processor, rows, None)
        if config is None:
            predictions = answer(model, processor, inputs)
        else:
            with patch_model(model, config) as patch:
                predictions = answer(model, processor, inputs)
                seen += patch.stats.visual_tokens_seen
                kept += patch.stats.visual_tokens_kept
        correct += sum(p == r["answer"] for p, r in zip(predictions, rows))
    return {"accuracy": correct / len(dataset), "visual_dropped": 1 - kept / seen if seen else 0.0}


@torch.no_grad()
def clip_prefill_ratios(model, processor, dataset, configs: dict[str, TTFConfig], batch: int, rounds: int) -> dict:
    """Prefill (one forward, no cache) CPU time of each config over unpatched, interleaved round-robin (round 0 is a
    warm-up); the ratio's median and spread over rounds."""
    inputs = encode(processor, dataset[:batch], None)
    arms: dict[str, TTFConfig | None] = {"plain": None, **configs}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(rounds + 1):
        for name, config in arms.items():
            patch = patch_model(model, config) if config is not None else None
            start = time.process_time()
            model(**inputs, use_cache=False)
            elapsed = time.process_time() - start
            if patch is not None:
                patch.remove()
            if round_index:
                times[name].append(elapsed)
    out: dict = {"plain_s": statistics.median(times["plain"])}
    for name in configs:
        ratios = [t / p for t, p in zip(times[name], times["plain"])]
        out[name] = {"s": statistics.median(times[name]), "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="testbed-l")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--levels", type=int, nargs="+", default=sorted(NOISE_LEVELS))
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--clip-frames", type=int, default=4)
    parser.add_argument("--clip-n", type=int, default=100)
    parser.add_argument("--clip-levels", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--part", choices=["stream", "clip", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "stream": {}, "clip": {}}
    if args.part in ("stream", "both"):
        clean = list(make_frame_dataset(args.n, args.seed, frames=args.frames))
        for level in args.levels:
            rows = noisy_rows(clean, level, args.seed)
            result = {name: run_stream(model, processor, rows, config, args.batch)
                      for name, config in STREAM_ARMS.items()}  # fmt: skip
            report["stream"][level] = result
            cells = "  ".join(f"{name} {r['accuracy']:.3f}" + (f" (reused {r['reused_share']:.2f})"
                              if r["reused_share"] is not None else "") for name, r in result.items())  # fmt: skip
            print(f"stream level {level} {NOISE_LEVELS[level]}: {cells}", flush=True)
    if args.part in ("clip", "both"):
        clip_configs = {
            "ttf(save_compute, reused)": TTFConfig(save_compute=True, keyframe_interval=args.clip_frames,
                                                   clip_keep="reused"),
            "ttf(save_compute, latest)": TTFConfig(save_compute=True, keyframe_interval=args.clip_frames,
                                                   clip_keep="latest"),
        }  # fmt: skip
        clean = list(make_frame_dataset(args.clip_n, args.seed, frames=args.clip_frames))
        for level in args.clip_levels:
            rows = noisy_rows(clean, level, args.seed)
            result = {"plain": run_clip(model, processor, rows, None, args.batch)}
            for name, config in clip_configs.items():
                result[name] = run_clip(model, processor, rows, config, args.batch)
            result["prefill"] = clip_prefill_ratios(model, processor, rows, clip_configs, args.batch, args.rounds)
            report["clip"][level] = result
            print(f"clip level {level} {NOISE_LEVELS[level]}: {json.dumps(result)}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
