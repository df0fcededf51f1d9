"""Training of the testbed models (``vlm-accel testbed train``).

* Reproducible: batches are a pure function of ``(seed, step)`` and the initial weights of ``seed``.
* Resumable: a checkpoint (safetensors: model, auxiliary head, optimizer moments; JSON: step and config) is written
  every ``ckpt_every`` steps to ``OUT/checkpoint/`` and picked up automatically.
* ``testbed-l`` trains the vision tower, projector and language model jointly; ``testbed-s`` copies the vision tower
  of a trained ``testbed-l`` (``--vision-from``), freezes it (so both models share identical vision weights) and
  trains its own projector and language model.
* ``testbed-describe`` (issue #15) starts from a trained testbed-l (``--init-from``): its vocabulary adds the
  describe family's words (``processor.DESCRIBE_WORDS``), so the embedding and output rows of testbed-l are copied
  and the new rows start at the mean of the old ones; the vision tower and (``freeze_projector``) the projector stay
  frozen, so it sees exactly testbed-l's visual tokens. The describe family enters the batches through
  ``describe_rows`` etc. (``packing.DescribeMix``).
* Loss: cross-entropy on answer and end-of-answer tokens only (several QAs packed per image), plus a dense auxiliary
  per-visual-token loss (a linear probe on the projector output predicting the object type / background and the
  quadrant of each token). The probe is training-only and not part of the shipped model; it makes the per-patch
  features learn in minutes instead of hours.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration

from .configs import DESCRIBE_MODELS, MODEL_NAMES, make_config
from .packing import (
    AUX_BACKGROUND,
    Batch,
    DescribeMix,
    encode_conversation,
    make_batch,
    patch_labels,
    pixel_values,
)
from .processor import build_processor
from .questions import FAMILIES, sample_eval_item
from .scenes import GRID, NUM_PATCHES, render

CKPT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (saved with the checkpoint and the final weights)."""

    model: str
    out: str
    seed: int = 0
    steps: int = 3000
    batch_size: int = 16
    qas_per_image: int = 8
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    aux_weight: float = 1.0
    grad_clip: float = 1.0
    device: str = "cpu"
    threads: int = 1
    bf16: bool = True
    vision_from: str | None = None
    init_from: str | None = None
    freeze_vision_at: int | None = None
    pretrain_steps: int = 400
    pretrain_pool: int = 1024
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    # training speed-up from step ``bg_drop_from`` on: with probability 1 - bg_full_p a step runs the language model
    # on text + object tokens + a random ``bg_keep`` = (lo, hi) number of background tokens (original positions).
    bg_drop_from: int | None = None
    bg_keep: tuple[int, int] = (16, 64)
    bg_full_p: float = 0.3
    # optional piecewise schedule overriding the three fields above: [(from_step, full_p, lo, hi), ...]
    bg_schedule: list = field(default_factory=list)
    # attention supervision (see RetrievalProbe): layer index (None = off), head, weight, first step
    probe_layer: int | None = None
    probe_head: int = 0
    probe_weight: float = 0.5
    probe_from: int = 0
    # counting supervision (see CountingProbe): layer index (None = off), head, weight, first step
    count_probe_layer: int | None = None
    count_probe_head: int = 1
    count_probe_weight: float = 0.5
    count_probe_from: int = 0
    # the step the learning-rate schedule (warm-up, then cosine to ``steps``) starts from: a fine-tuning segment of
    # a resumed run gets its own warm-up and decay
    schedule_from: int = 0
    # stop (checkpoint and save) after this step without changing the schedule: replays a segment of a run
    stop_at: int | None = None
    # per-family weight of the answer loss (e.g. {"count": 3.0}); unlisted families and <eos> targets weigh 1
    family_weights: dict = field(default_factory=dict)
    # language prior (see packing.sample_training_item): P("yes") for an absent co-occurrence partner, from a step on
    prior_yes_p: float = 0.0
    prior_items: float = 0.0
    prior_from: int = 0
    # describe family (testbed-describe only; see packing.DescribeMix): share of describe-only rows, share of those
    # built around an absent partner, the planted prior in their targets, primed questions and their prior
    describe_rows: float = 0.0
    describe_absent_items: float = 0.5
    describe_prior: float = 0.6
    primed_p: float = 0.5
    primed_yes_p: float = 0.5
    freeze_projector: bool = False
    ckpt_every: int = 100
    eval_every: int = 250
    eval_per_family: int = 40
    extra: dict = field(default_factory=dict)


class AuxHead(nn.Module):
    """Training-only linear probes on visual tokens: object type (30 types + background) and quadrant."""

    def __init__(self, hidden: int):
        super().__init__()
        self.obj_type = nn.Linear(hidden, AUX_BACKGROUND + 1)
        self.quadrant = nn.Linear(hidden, 4)

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.obj_type(feats).float()  # (B, 256, 31)
        per_tok = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        obj = labels != AUX_BACKGROUND
        loss_obj = (per_tok * obj).sum() / obj.sum().clamp(min=1)
        loss_bg = (per_tok * ~obj).sum() / (~obj).sum().clamp(min=1)
        idx = torch.arange(NUM_PATCHES, device=feats.device)
        quad = ((idx // GRID) >= GRID // 2).long() * 2 + ((idx % GRID) >= GRID // 2).long()
        q_logits = self.quadrant(feats).float()
        q_loss = F.cross_entropy(q_logits[obj], quad.expand_as(labels)[obj]) if obj.any() else feats.sum() * 0
        return loss_obj + 0.2 * loss_bg + 0.5 * q_loss


def image_embeddings(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens (B, 256, H) through the model's own ``get_image_features``."""
    feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def subsample_background(batch: Batch, image_token_id: int, n_bg: int, seed: int) -> torch.Tensor:
    """Indices (B, L') of the positions kept when training on a shortened sequence: every text position, every
    object token, and ``n_bg`` random background visual tokens per row (original order; rows padded by repeating
    their last position, which the caller masks)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[b].cpu()
        img_pos = (ids == image_token_id).nonzero().flatten()
        obj = batch.patch_labels[b].cpu() != AUX_BACKGROUND
        bg = (~obj).nonzero().flatten()
        pick = bg[torch.randperm(len(bg), generator=gen)[:n_bg]]
        keep_img = torch.zeros(len(img_pos), dtype=torch.bool)
        keep_img[obj] = True
        keep_img[pick] = True
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[img_pos[~keep_img]] = False
        rows.append(keep.nonzero().flatten())
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows]).to(batch.input_ids.device)


def padding_repeats(keep_index: torch.Tensor) -> torch.Tensor:
    """Bool (B, L'): the slots of a shortened run that repeat the previous kept position (row padding, masked)."""
    dup = torch.zeros_like(keep_index, dtype=torch.bool)
    dup[:, 1:] = keep_index[:, 1:] == keep_index[:, :-1]
    return dup


def shortened_positions(input_ids: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    """(B, L): where each original position sits in the shortened run (-1 if it was dropped)."""
    new_of_old = torch.full_like(input_ids, -1)
    slots = torch.arange(keep_index.shape[1], device=keep_index.device).expand_as(keep_index).contiguous()
    return new_of_old.scatter_(1, keep_index, slots)


def background_plan(cfg: TrainConfig, step: int) -> tuple[float, int, int] | None:
    """(probability of a full-sequence step, min, max background tokens kept) at ``step``, or None (always full)."""
    plan = None
    if cfg.bg_drop_from is not None and step >= cfg.bg_drop_from:
        plan = (cfg.bg_full_p, cfg.bg_keep[0], cfg.bg_keep[1])
    for start, full_p, lo, hi in sorted(cfg.bg_schedule):
        if step >= start:
            plan = (float(full_p), int(lo), int(hi))
    return plan


class RetrievalProbe:
    """Training-only attention supervision: captures the input of one attention layer and scores how much of one
    head's attention (from each answer-predicting position, over the visual tokens) falls on the tokens the
    question is about. Loss = −log(attention mass on those tokens), for targets that refer to ≥ 1 visible token.
    It teaches the content-based retrieval circuit directly instead of waiting for it to emerge."""

    def __init__(self, model: LlavaForConditionalGeneration, layer: int, head: int = 0):
        self.attn = model.model.language_model.layers[layer].self_attn
        self.head = head
        self.captured: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        self.captured = (hs, kwargs["position_embeddings"])

    def remove(self) -> None:
        self.handle.remove()

    def _scores(self, batch: Batch, image_token_id: int, keep_index: torch.Tensor | None):
        """The supervised head's attention logits from each target's predicting position (T, L'), the patch index
        each key holds (T, L'; -1 for text and padding repeats) and which keys that position attends to (T, L')."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hs, (cos, sin) = self.captured
        self.captured = None
        a = self.attn
        d = a.head_dim
        bsz, length, _ = hs.shape
        q = a.q_proj(hs).view(bsz, length, -1, d).transpose(1, 2)[:, self.head : self.head + 1]
        kv_head = self.head // (a.config.num_attention_heads // a.config.num_key_value_heads)
        k = a.k_proj(hs).view(bsz, length, -1, d).transpose(1, 2)[:, kv_head : kv_head + 1]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q[:, 0].float(), k[:, 0].float()  # (B, L, D)
        ids = batch.input_ids
        patch_of_pos = torch.full_like(ids, -1)
        is_img = ids == image_token_id
        patch_of_pos[is_img] = torch.arange(NUM_PATCHES, device=ids.device).repeat(bsz)
        valid = batch.attention_mask.bool()
        if keep_index is None:
            new_of_old = torch.arange(length, device=ids.device).expand(bsz, -1)
        else:
            dup = padding_repeats(keep_index)
            patch_of_pos = torch.gather(patch_of_pos, 1, keep_index).masked_fill(dup, -1)
            valid = torch.gather(valid, 1, keep_index) & ~dup
            new_of_old = shortened_positions(ids, keep_index)
        rows, pos = batch.target_rows, new_of_old[batch.target_rows, batch.target_pos - 1]
        scores = torch.einsum("td,tld->tl", q[rows, pos], k[rows]) / math.sqrt(d)  # (T, L)
        causal = valid[rows] & (torch.arange(length, device=ids.device)[None, :] <= pos[:, None])
        return scores, patch_of_pos[rows], causal

    def _relevant(self, batch: Batch, patches: torch.Tensor) -> torch.Tensor:
        vis = patches >= 0
        rel = torch.zeros_like(vis)
        rel[vis] = batch.target_patches.gather(1, patches.clamp(min=0))[vis]
        return rel

    def loss(self, batch: Batch, image_token_id: int, keep_index: torch.Tensor | None) -> torch.Tensor:
        scores, patches, _ = self._scores(batch, image_token_id, keep_index)
        vis = patches >= 0  # (T, L) visual tokens present in this row
        rel = self._relevant(batch, patches)
        use = rel.any(-1)
        if not use.any():
            return scores.sum() * 0
        scores = scores[use]
        all_lse = torch.logsumexp(scores.masked_fill(~vis[use], -1e9), -1)
        rel_lse = torch.logsumexp(scores.masked_fill(~rel[use], -1e9), -1)
        return (all_lse - rel_lse).mean()


class CountingProbe(RetrievalProbe):
    """Training-only attention supervision for ``count`` answers: one head should spread its attention evenly over
    the ``<bos>`` token and the n objects counted, and put none anywhere else. Its output is then (v_bos + n·v_obj)
    / (n + 1), a value that encodes n — the attention-sink counting mechanism — instead of an average diluted by
    however many background tokens the row holds. Loss = cross-entropy between that head's causal attention
    (from the answer-predicting position) and the uniform distribution over ``<bos>`` ∪ the counted tokens."""

    def loss(self, batch: Batch, image_token_id: int, keep_index: torch.Tensor | None) -> torch.Tensor:
        scores, patches, causal = self._scores(batch, image_token_id, keep_index)
        use = torch.tensor([f == "count" for f in batch.target_family], device=scores.device)
        if not use.any():
            return scores.sum() * 0
        target = self._relevant(batch, patches)
        target[:, 0] = True  # <bos> is the first position of every row (right padding) and is always kept
        scores, target, causal = scores[use], target[use], causal[use]
        logp = torch.log_softmax(scores.masked_fill(~causal, -1e9), -1)
        return -(logp * target).sum(-1).div(target.sum(-1)).mean()


def answer_logits(
    model: LlavaForConditionalGeneration,
    batch: Batch,
    feats: torch.Tensor | None = None,
    keep_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each target token (T, V), and the visual features used.

    ``keep_index`` (B, L') runs the language model on those positions only, with their original position ids
    (training speed-up: most visual tokens are background; see ``TrainConfig.bg_keep``)."""
    if feats is None:
        feats = image_embeddings(model, batch.pixel_values)
    emb = model.get_input_embeddings()(batch.input_ids)
    img_mask = (batch.input_ids == model.config.image_token_id).unsqueeze(-1)
    emb = emb.masked_scatter(img_mask, feats.to(emb.dtype))
    if keep_index is None:
        out = model.model.language_model(inputs_embeds=emb, attention_mask=batch.attention_mask)
        h = out.last_hidden_state[batch.target_rows, batch.target_pos - 1]
    else:
        emb = torch.gather(emb, 1, keep_index.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
        mask = torch.gather(batch.attention_mask, 1, keep_index)
        mask = mask.masked_fill(padding_repeats(keep_index), 0)
        out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=keep_index)
        new_of_old = shortened_positions(batch.input_ids, keep_index)
        h = out.last_hidden_state[batch.target_rows, new_of_old[batch.target_rows, batch.target_pos - 1]]
    return model.lm_head(h).float(), feats


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, families: list[str], weights: dict) -> torch.Tensor:
    """Cross-entropy over the answer targets, each weighted by its family's weight (a weighted mean)."""
    if not weights:
        return F.cross_entropy(logits, targets)
    w = torch.tensor([float(weights.get(f, 1.0)) for f in families], device=logits.device)
    return (F.cross_entropy(logits, targets, reduction="none") * w).sum() / w.sum()


def describe_mix(cfg: TrainConfig) -> DescribeMix | None:
    """The describe family's batch mix of a run (None when ``describe_rows`` is 0)."""
    if cfg.describe_rows <= 0:
        return None
    if cfg.model not in DESCRIBE_MODELS:
        raise ValueError(f"the describe family needs the extended vocabulary of {DESCRIBE_MODELS}, not {cfg.model!r}")
    return DescribeMix(rows=cfg.describe_rows, absent_items=cfg.describe_absent_items, prior=cfg.describe_prior,
                       primed_p=cfg.primed_p, primed_yes_p=cfg.primed_yes_p)  # fmt: skip


def load_resized(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` where only the vocabulary grew: embedding and output rows are copied, the new
    rows set to the mean of the copied ones (any other shape mismatch is an error)."""
    own = model.state_dict()
    if own.keys() != state.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(own.keys() ^ state.keys())[:4]}")
    fixed = {}
    for k, v in state.items():
        if v.shape == own[k].shape:
            fixed[k] = v
        elif v.ndim == 2 and v.shape[1] == own[k].shape[1] and v.shape[0] < own[k].shape[0]:
            grown = v.mean(0, keepdim=True).expand(own[k].shape[0] - v.shape[0], -1)
            fixed[k] = torch.cat([v, grown]).to(own[k].dtype)
        else:
            raise ValueError(f"{k}: cannot load shape {tuple(v.shape)} into {tuple(own[k].shape)}")
    model.load_state_dict(fixed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    step, steps = step - cfg.schedule_from, cfg.steps - cfg.schedule_from
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_model(cfg: TrainConfig) -> LlavaForConditionalGeneration:
    """Fresh (seeded) model, optionally warm-started and/or with a copied, frozen vision tower."""
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"unknown testbed model {cfg.model!r}; expected one of {MODEL_NAMES}")
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(make_config(cfg.model))
    if cfg.init_from:
        src = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
        load_resized(model, src.state_dict())
    if cfg.vision_from:
        path = Path(cfg.vision_from)
        if path.is_file():  # a vision_tower.safetensors written by a testbed-l run (see ``freeze_vision_at``)
            model.model.vision_tower.load_state_dict(load_file(str(path)))
        else:
            src = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
            model.model.vision_tower.load_state_dict(src.model.vision_tower.state_dict())
        model.model.vision_tower.requires_grad_(False)
    if cfg.freeze_projector:
        model.model.multi_modal_projector.requires_grad_(False)
    return model


def make_optimizer(model: nn.Module, aux: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for m in (model, aux):
        for _, p in m.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )


def _optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{pid}.{k}"] = torch.as_tensor(v).clone()
    return out


def _load_optim_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(out: Path, model: nn.Module, aux: nn.Module, opt: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig, log: list[dict]) -> None:  # fmt: skip
    """Write ``OUT/checkpoint/`` atomically (safetensors + JSON; nothing is pickled)."""
    ck = out / CKPT_DIR
    tmp = out / (CKPT_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in aux.state_dict().items()}, str(tmp / "aux.safetensors"))
    save_file(_optim_tensors(opt), str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(cfg), "log": log}, indent=1))
    if ck.exists():
        for f in ck.iterdir():
            f.unlink()
        ck.rmdir()
    tmp.rename(ck)


def validation_batch(n_per_family: int, seed: int = 987_654) -> tuple[Batch, list[str]]:
    """Single-question items (one per row) for teacher-forced validation; families of the answer targets."""
    rng = np.random.default_rng(seed)
    images, seqs, labels, fams = [], [], [], []
    rows, poss = [], []
    b = 0
    for fam in FAMILIES:
        for _ in range(n_per_family):
            scene, qa = sample_eval_item(rng, fam)
            ids, pos, _ = encode_conversation([qa])
            images.append(render(scene))
            labels.append(patch_labels(scene))
            seqs.append(ids)
            rows.append(b)
            poss.append(pos[0])
            fams.append(fam)
            b += 1
    length = max(len(s) for s in seqs)
    input_ids = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    batch = Batch(pixel_values(images), input_ids, mask, torch.tensor(rows), torch.tensor(poss), fams,
                  torch.from_numpy(np.stack(labels)))  # fmt: skip
    return batch, fams


@torch.no_grad()
def validate(model: LlavaForConditionalGeneration, batch: Batch, fams: list[str], cfg: TrainConfig) -> dict[str, float]:
    """Teacher-forced answer accuracy per family (argmax over the vocabulary at the answer position)."""
    model.eval()
    correct = []
    for s in range(0, batch.input_ids.shape[0], 50):
        sub = Batch(batch.pixel_values[s : s + 50], batch.input_ids[s : s + 50], batch.attention_mask[s : s + 50],
                    batch.target_rows[s : s + 50] - s, batch.target_pos[s : s + 50], fams[s : s + 50],
                    batch.patch_labels[s : s + 50]).to(cfg.device)  # fmt: skip
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, _ = answer_logits(model, sub)
        tgt = sub.input_ids[sub.target_rows, sub.target_pos]
        correct += (logits.argmax(-1) == tgt).cpu().tolist()
    model.train()
    res = {f: float(np.mean([c for c, g in zip(correct, fams) if g == f])) for f in FAMILIES}
    res["mean"] = float(np.mean(list(res.values())))
    return res


def freeze_vision(model: LlavaForConditionalGeneration, out: Path) -> None:
    """Freeze the vision tower from now on and write it to ``OUT/vision_tower.safetensors`` (for ``testbed-s``)."""
    tower = model.model.vision_tower
    if any(p.requires_grad for p in tower.parameters()) or not (out / "vision_tower.safetensors").exists():
        tower.requires_grad_(False)
        for p in tower.parameters():
            p.grad = None
        save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()},
                  str(out / "vision_tower.safetensors"))  # fmt: skip


def pretrain_visual_tokens(model: LlavaForConditionalGeneration, aux: AuxHead, cfg: TrainConfig) -> list[dict]:
    """Stage 0: train the trainable part of vision tower + projector (and the probe) on the dense per-token
    auxiliary loss alone, on a pool of rendered scenes. Cheap (no language model) and it gives the language model
    informative visual tokens from its first step."""
    from .packing import sample_training_item

    rng = np.random.default_rng([cfg.seed, 31337])
    scenes = [sample_training_item(rng, 1)[0] for _ in range(cfg.pretrain_pool)]
    pix = pixel_values([render(s) for s in scenes])
    labels = torch.from_numpy(np.stack([patch_labels(s) for s in scenes]))
    params = [p for p in (*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
                          *aux.parameters()) if p.requires_grad]  # fmt: skip
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, betas=(0.9, 0.98), weight_decay=0.0)
    log = []
    for step in range(cfg.pretrain_steps):
        idx = torch.from_numpy(rng.choice(len(scenes), size=cfg.pretrain_batch, replace=False))
        for g in opt.param_groups:
            g["lr"] = cfg.pretrain_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / cfg.pretrain_steps))
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            feats = image_embeddings(model, pix[idx].to(cfg.device))
            loss = aux.loss(feats, labels[idx].to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log.append({"pretrain_step": step + 1, "aux": round(loss.item(), 4)})
            print(json.dumps(log[-1]), flush=True)
    return log


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the output directory holding the final weights and processor."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg).to(cfg.device)
    aux = AuxHead(model.config.text_config.hidden_size).to(cfg.device)
    opt = make_optimizer(model, aux, cfg)
    mix = describe_mix(cfg)
    start, log = 0, []
    ck = out / CKPT_DIR
    if (ck / "state.json").exists():
        state = json.loads((ck / "state.json").read_text())
        model.load_state_dict(load_file(str(ck / "model.safetensors"), device=str(cfg.device)))
        aux.load_state_dict(load_file(str(ck / "aux.safetensors"), device=str(cfg.device)))
        _load_optim_tensors(opt, load_file(str(ck / "optimizer.safetensors"), device=str(cfg.device)))
        start, log = int(state["step"]), state.get("log", [])
    if start == 0 and cfg.pretrain_steps > 0 and not cfg.init_from:
        log += pretrain_visual_tokens(model, aux, cfg)
    val_batch, val_fams = validation_batch(cfg.eval_per_family)
    probe = RetrievalProbe(model, cfg.probe_layer, cfg.probe_head) if cfg.probe_layer is not None else None
    counting = None
    if cfg.count_probe_layer is not None:
        counting = CountingProbe(model, cfg.count_probe_layer, cfg.count_probe_head)
    model.train()
    dev_type = torch.device(cfg.device).type
    t0 = time.time()
    ema: dict[str, float] = {}
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]  # fmt: skip
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"train {cfg.model}", total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            if cfg.freeze_vision_at is not None and step >= cfg.freeze_vision_at:
                freeze_vision(model, out)
            prior = cfg.prior_yes_p if step >= cfg.prior_from else 0.0
            batch = make_batch(cfg.seed, step, cfg.batch_size, cfg.qas_per_image, prior, cfg.prior_items, mix)
            batch = batch.to(cfg.device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            keep_index = None
            plan = background_plan(cfg, step)
            if plan is not None:
                full_p, lo, hi = plan
                drop_rng = np.random.default_rng([cfg.seed, step, 104729])
                if drop_rng.random() >= full_p:
                    n_bg = int(drop_rng.integers(lo, hi + 1))
                    keep_index = subsample_background(batch, model.config.image_token_id, n_bg, cfg.seed * 100_003 + step)
            use_probe = probe is not None and step >= cfg.probe_from
            with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits, feats = answer_logits(model, batch, keep_index=keep_index)
                tgt = batch.input_ids[batch.target_rows, batch.target_pos]
                lm_loss = answer_loss(logits, tgt, batch.target_family, cfg.family_weights)
                aux_loss = aux.loss(feats, batch.patch_labels) if cfg.aux_weight else lm_loss.detach() * 0
                loss = lm_loss + cfg.aux_weight * aux_loss
                if use_probe:
                    probe_loss = probe.loss(batch, model.config.image_token_id, keep_index)
                    loss = loss + cfg.probe_weight * probe_loss
                use_counting = counting is not None and step >= cfg.count_probe_from
                if use_counting:
                    count_loss = counting.loss(batch, model.config.image_token_id, keep_index)
                    loss = loss + cfg.count_probe_weight * count_loss
            for p in (probe, counting):
                if p is not None:
                    p.captured = None
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                ok = (logits.argmax(-1) == tgt).float().cpu()
            ans = torch.tensor([f != "eos" for f in batch.target_family])
            metrics = [("loss", lm_loss.item()), ("aux", aux_loss.item()), ("acc", ok[ans].mean().item())]
            if mix is not None:  # teacher-forced token accuracy of the description words
                desc = torch.tensor([f == "describe" for f in batch.target_family])
                metrics.append(("describe_acc", ok[desc].mean().item()))
            if use_probe:
                metrics.append(("probe", probe_loss.item()))
            if use_counting:
                metrics.append(("count_probe", count_loss.item()))
            for k, v in metrics:
                ema[k] = v if k not in ema else 0.98 * ema[k] + 0.02 * v
            info = f"loss {ema['loss']:.3f} aux {ema['aux']:.3f} acc {ema['acc']:.3f}"
            if "probe" in ema:
                info += f" probe {ema['probe']:.3f}"
            if "count_probe" in ema:
                info += f" count-probe {ema['count_probe']:.3f}"
            if "describe_acc" in ema:
                info += f" describe {ema['describe_acc']:.3f}"
            entry = {"step": step + 1, "time": time.time() - t0, **{k: round(v, 4) for k, v in ema.items()}}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                entry["val"] = validate(model, val_batch, val_fams, cfg)
                info += " | val " + " ".join(f"{k[:3]} {v:.2f}" for k, v in entry["val"].items())
                if not progress:
                    print(json.dumps(entry), flush=True)
            if (step + 1) % 25 == 0 or "val" in entry:
                log.append(entry)
            bar.update(task, advance=1, info=info)
            stop = cfg.stop_at is not None and step + 1 >= cfg.stop_at
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or stop:
                save_checkpoint(out, model, aux, opt, step + 1, cfg, log)
            if stop:
                break
    for p in (probe, counting):
        if p is not None:
            p.remove()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    build_processor(describe=cfg.model in DESCRIBE_MODELS).save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps({"config": asdict(cfg), "log": log}, indent=1))
    return out
