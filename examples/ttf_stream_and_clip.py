"""TTF in its two modes on the bundled testbed model (offline, CPU, a few seconds).

stream: one frame per call, as a robot policy runs; each batch row is its own stream; ``patch.reset()`` starts a new
episode. clip: several frames in one prompt, each fused with the one before it; ``save_compute=True`` also drops
the reused tokens from the language model (from layer 1 on) and skips the vision tower for frames with nothing new.

Run: ``python examples/ttf_stream_and_clip.py``
"""

from __future__ import annotations

import torch

from vlm_accel import patch_model
from vlm_accel.testbed import load_model, make_frame_dataset
from vlm_accel.testbed.frames import FrameNoise, noisy_frames


def prompt(processor, question: str, images: int) -> str:
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def main() -> None:
    torch.set_num_threads(1)
    model, processor = load_model("testbed-l")
    items = list(make_frame_dataset(2, seed=7, frames=5))  # one object moves one cell per frame
    for item in items:
        item["frames"] = noisy_frames(item["frames"], FrameNoise(sensor=2.0), seed=1)
    pad = processor.tokenizer.pad_token_id

    # --- stream: two episodes side by side (batch rows), one frame per call
    patch = patch_model(model, "ttf")  # README defaults: keyframe every 3, τ = 0.03, top 70/256 relevant patches
    with torch.no_grad(), patch.stream():
        for t in range(5):
            texts = [prompt(processor, item["question"], 1) for item in items]
            images = [item["frames"][t] for item in items]
            inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=pad)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        patch.reset()  # the next call would start new episodes with a keyframe
    print("stream answers", answers, "expected", [item["answer"] for item in items])
    print("stream stats", patch.stats.methods["ttf"])
    patch.remove()

    # --- clip: all five frames in one prompt, compute-saving mode (one keyframe per clip)
    with patch_model(model, "ttf", save_compute=True, keyframe_interval=5) as patch, torch.no_grad():
        texts = [prompt(processor, item["question"], 5) for item in items]
        images = [frame for item in items for frame in item["frames"]]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=pad)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        stats = patch.stats
    print("clip answers", answers, "(several images per prompt is out of the testbed's training distribution)")
    print(f"clip: {stats.visual_tokens_kept}/{stats.visual_tokens_seen} visual tokens reach layers >= 1;",
          "tokens per layer", stats.tokens_per_layer, stats.methods["ttf"])  # fmt: skip


if __name__ == "__main__":
    main()
