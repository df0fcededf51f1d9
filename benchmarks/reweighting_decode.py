"""Decode-step cost of the attention-reweighting methods (PAI, PAINT-style row edits) against the unpatched model.

A mid-size LLaVA geometry with random weights (Llama text model: 8 layers, hidden 1024, 16 heads × 64, MLP 2816,
vocab 32000; a one-layer CLIP tower giving 576 visual tokens), a 2048-token prompt (576 visual + 1472 text) in the
cache, fp32, CPU, one thread. Each arm has its own model copy (same weights) and its own prefilled cache; a step
feeds one token and crops the cache back, so every step sees 2048 cached tokens. Arms run interleaved, timed with
the thread's CPU time; the script prints the median and the interquartile spread of each arm and each ratio.

Arms: ``unpatched``; ``pai`` (α = 0.2, layers 2–32 of 32 → 1–8 here, no guidance); ``pai+guidance``: PAI's
image-free guidance as it now runs — the same step on a doubled batch (the prompt with its image, and without it,
left-padded) — against ``unpatched`` at batch 1, which is the guidance's whole cost per step.

``--attention`` times the attention call alone at one decode row over 2048 keys (16 heads × 64, fp32 and bf16):
stock SDPA against the edited-row path (``edited_rows_attention`` with PAI's edit), interleaved.

    PYTHONPATH=$PWD python -P benchmarks/reweighting_decode.py [--steps 40] [--layers 8]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlm_accel import patch_model
from vlm_accel.methods.pai import amplify_visual_logits
from vlm_accel.runtime import scores

IMAGE_TOKEN = 31999
VISUAL, TEXT = 576, 1472


def build(layers: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=336, patch_size=14)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")  # fmt: skip
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config).eval()


def prompt(doubled: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, 31000, (TEXT,), generator=g)
    ids = torch.cat([text[:16], torch.full((VISUAL,), IMAGE_TOKEN), text[16:]])[None]
    mask = torch.ones_like(ids)
    if doubled:  # the image-free row: the same text, left-padded to the same width
        free = torch.cat([torch.zeros(VISUAL, dtype=ids.dtype), text])[None]
        free_mask = torch.cat([torch.zeros(VISUAL, dtype=ids.dtype), torch.ones(TEXT, dtype=ids.dtype)])[None]
        ids, mask = torch.cat([ids, free]), torch.cat([mask, free_mask])
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


class Arm:
    def __init__(self, name: str, model, inputs: dict[str, torch.Tensor]) -> None:
        self.name, self.model, self.times = name, model, []
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        self.cache, self.length = out.past_key_values, inputs["input_ids"].shape[1]
        batch = inputs["input_ids"].shape[0]
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        self.mask = torch.cat([inputs["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], dim=1)

    def step(self) -> None:
        start = time.thread_time()
        with torch.no_grad():
            self.model(input_ids=self.token, attention_mask=self.mask, past_key_values=self.cache, use_cache=True,
                       logits_to_keep=1)  # fmt: skip
        self.times.append(time.thread_time() - start)
        self.cache.crop(-1)  # back to the prompt: every step sees the same cache


def spread(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def attention_only(dtype: torch.dtype, steps: int) -> None:
    """One decode row's attention at one layer: SDPA vs the edited-row path (now / with V upcast)."""
    g = torch.Generator().manual_seed(2)
    n = VISUAL + TEXT
    q = torch.randn(1, 16, 1, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 16, n, 64, generator=g).to(dtype) for _ in range(2))
    visual = torch.zeros(1, n, dtype=torch.bool)
    visual[:, 16 : 16 + VISUAL] = True
    rows = torch.zeros(1, 1, dtype=torch.long)
    edit = functools.partial(amplify_visual_logits, 0.2)
    arms = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125),
        "edited row (PAI)": lambda: scores.edited_rows_attention(q, k, v, None, rows, 0.125, visual, [edit], 0, None),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for i in range(steps):
        for name in names[i % 2 :] + names[: i % 2]:
            start = time.thread_time()
            for _ in range(20):
                arms[name]()
            times[name].append((time.thread_time() - start) / 20)
    print(f"attention call, 1 row × {n} keys, 16 heads × 64, {dtype}, CPU 1 thread")
    for name in names:
        q1, median, q3 = spread(times[name])
        rm = statistics.median(t / r for t, r in zip(times[name], times["sdpa"], strict=True))
        print(f"  {name:32s} {median * 1e6:8.1f} µs (IQR {q1 * 1e6:.1f}–{q3 * 1e6:.1f})   ratio {rm:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--attention", action="store_true", help="also time the attention call alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.attention:
        for dtype in (torch.float32, torch.bfloat16):
            attention_only(dtype, args.steps)
    base = build(args.layers)
    copies = [build(args.layers) for _ in range(2)]
    for copy in copies:
        copy.load_state_dict(base.state_dict())
    patch_model(copies[0], "pai", gamma=1.0)
    patch_model(copies[1], "pai", gamma=1.0)  # the doubled batch is what guidance adds to every forward
    arms = [Arm("unpatched", base, prompt(False)), Arm("pai", copies[0], prompt(False)),
            Arm("pai+guidance (doubled batch)", copies[1], prompt(True))]  # fmt: skip
    for arm in arms:  # warm-up
        arm.step()
        arm.times.clear()
    for i in range(args.steps):
        for arm in arms[i % 3 :] + arms[: i % 3]:  # rotate the order: no arm always runs first
            arm.step()
    print(f"decode step, {VISUAL + TEXT} cached tokens, {args.layers} layers, fp32, CPU 1 thread, {args.steps} steps")
    reference = arms[0].times
    for arm in arms:
        q1, median, q3 = spread(arm.times)
        ratios = [t / r for t, r in zip(arm.times, reference, strict=True)]
        r1, rm, r3 = spread(ratios)
        print(f"  {arm.name:30s} {median * 1e3:7.2f} ms (IQR {q1 * 1e3:.2f}–{q3 * 1e3:.2f})   "
              f"ratio {rm:.3f} (IQR {r1:.3f}–{r3:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
