"""Analytic FLOPs of a LLaVA-style language-model forward, from the text config and per-layer token counts.

The count (1 multiply-add = 2 FLOPs), for one decoder layer processing ``n`` query tokens against ``c`` key/value
tokens (``c = n`` for a prefill without a cached prefix), hidden size ``d``, ``h`` query heads and ``h_kv``
key/value heads of size ``d_h``, and MLP width ``m``::

    q_proj + o_proj   2·n·d·(h·d_h)  ×2
    k_proj + v_proj   2·n·d·(h_kv·d_h) ×2          (GQA-aware)
    QKᵀ and P·V       2·n·c·(h·d_h) ×2            (the full score matrix: no causal halving)
    MLP               2·n·d·m × (3 if gated else 2)   (Llama/Qwen2/Mistral: gate, up, down)

plus the LM head, ``2·t·d·V`` for the ``t`` positions whose logits are computed (``generate()`` computes one per
row at prefill). Norms, RoPE, softmax and activations are ignored (O(n·d)). With ``h·d_h = d``, ``h_kv = h`` and a
two-matrix MLP this is exactly twice the FastV paper's per-layer count ``4nd² + 2n²d + 2ndm``, which counts
multiply-adds; :func:`fastv_paper_layer_macs` gives that formula verbatim, for comparison with papers.

The vision tower and projector are not counted: token pruning inside the LM does not change them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GATED_ACTIVATION_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "vicuna")


@dataclass(frozen=True)
class TextGeometry:
    """The shapes of a decoder-only language model that the FLOPs count needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    gated_mlp: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TextGeometry.{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @classmethod
    def from_config(cls, config: Any) -> TextGeometry:
        """From a text config, or a VLM config holding one as ``text_config``."""
        text = getattr(config, "text_config", None) or config
        try:
            hidden = int(text.hidden_size)
            heads = int(text.num_attention_heads)
            layers = int(text.num_hidden_layers)
            intermediate = int(text.intermediate_size)
            vocab = int(text.vocab_size)
        except AttributeError as err:
            raise TypeError(f"{type(text).__name__} is not a decoder text config: {err}") from None
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        model_type = getattr(text, "model_type", "")
        gated = getattr(text, "hidden_act", "silu") in ("silu", "swish", "gelu_pytorch_tanh") or (
            model_type in GATED_ACTIVATION_MODELS
        )
        return cls(hidden, heads, kv_heads, head_dim, intermediate, layers, vocab, gated)


def layer_flops(geometry: TextGeometry, n: int, context: int | None = None) -> int:
    """FLOPs of one decoder layer for ``n`` query tokens over ``context`` key/value tokens (default ``n``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    c = n if context is None else context
    g = geometry
    q_width, kv_width = g.heads * g.head_dim, g.kv_heads * g.head_dim
    projections = 2 * n * g.hidden * q_width * 2 + 2 * n * g.hidden * kv_width * 2
    attention = 2 * n * c * q_width * 2
    mlp = 2 * n * g.hidden * g.intermediate * (3 if g.gated_mlp else 2)
    return projections + attention + mlp


def lm_head_flops(geometry: TextGeometry, positions: int) -> int:
    return 2 * positions * geometry.hidden * geometry.vocab


def prefill_flops(
    geometry: TextGeometry,
    tokens_per_layer: Sequence[int],
    batch: int = 1,
    logits_positions: int = 1,
) -> int:
    """FLOPs of a prefill: each layer ``l`` processes ``tokens_per_layer[l]`` tokens (per row, no cached prefix),
    plus the LM head on ``logits_positions`` positions per row."""
    if len(tokens_per_layer) != geometry.layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for {geometry.layers} layers")
    per_row = sum(layer_flops(geometry, int(n)) for n in tokens_per_layer)
    return batch * (per_row + lm_head_flops(geometry, logits_positions))


def decode_step_flops(geometry: TextGeometry, kv_length_per_layer: Sequence[int], batch: int = 1) -> int:
    """FLOPs of one decode step: one new token per row attending over each layer's cache (``kv_length`` after
    appending the new token)."""
    if len(kv_length_per_layer) != geometry.layers:
        raise ValueError(f"kv_length_per_layer has {len(kv_length_per_layer)} entries for {geometry.layers} layers")
    per_row = sum(layer_flops(geometry, 1, int(c)) for c in kv_length_per_layer)
    return batch * (per_row + lm_head_flops(geometry, 1))


def fastv_paper_layer_macs(n: int, d: int, m: int) -> int:
    """The FastV paper's per-layer count ``4nd² + 2n²d + 2ndm`` (multiply-adds, MHA, two-matrix MLP)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def fastv_paper_ratio(n: int, n_kept: int, layer: int, num_layers: int, d: int, m: int) -> float:
    """FastV's theoretical FLOPs ratio ``[K·c(n) + (L−K)·c(n̂)] / [L·c(n)]``."""
    full = fastv_paper_layer_macs(n, d, m)
    return (layer * full + (num_layers - layer) * fastv_paper_layer_macs(n_kept, d, m)) / (num_layers * full)


def planned_tokens_per_layer(
    num_layers: int, seq_len: int, visual: int, layer: int | None = None, kept_visual: int | None = None
) -> list[int]:
    """Per-layer widths of a single-stage pruning schedule: ``seq_len`` up to ``layer - 1``, then
    ``seq_len - visual + kept_visual`` (no pruning when ``layer`` is None)."""
    if layer is None or kept_visual is None:
        return [seq_len] * num_layers
    if not 0 <= kept_visual <= visual <= seq_len:
        raise ValueError(f"need 0 <= kept_visual ({kept_visual}) <= visual ({visual}) <= seq_len ({seq_len})")
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer must be in [1, {num_layers - 1}], got {layer}")
    short = seq_len - visual + kept_visual
    return [seq_len] * layer + [short] * (num_layers - layer)
