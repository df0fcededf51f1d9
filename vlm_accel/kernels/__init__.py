"""Attention kernels for vlm_accel: torch references everywhere, Triton on CUDA (opt-in).

One entry point per op, each backed by a ``torch.library.custom_op`` (``vlm_accel::<name>``) whose default
implementation is the pure-torch reference and whose CUDA implementation can launch Triton:

* :func:`attention_row_probs` — fp32 attention probabilities of a few query rows (FastV, SGL/SparseVLM, GIFT,
TTF).
* :func:`compact_kv` — gather kept positions from many ``[B,H,S,D]`` cache tensors at once.
* :func:`head_sparse_decode_attention` — decode attention that skips unselected heads' K/V (MoH).
* :func:`biased_attention` — attention with an additive per-key logit bias, no dense float mask.

The Triton path is off by default until a GPU benchmark shows it beats the reference (docs/kernels.md);
enable it per call with ``use_triton=True`` or globally with ``VLM_ACCEL_TRITON=1``. ``triton`` is imported
lazily.
"""

from ._dispatch import ENV_FLAG, interpreter_active, triton_available
from .biased_attention import biased_attention, biased_attention_reference
from .compact import compact_kv, compact_kv_reference
from .head_sparse import (
    head_sparse_decode_attention,
    head_sparse_decode_attention_reference,
    head_sparse_decode_attention_torch,
)
from .row_probs import REDUCTIONS, attention_row_probs, attention_row_probs_reference

__all__ = [
    "ENV_FLAG",
    "REDUCTIONS",
    "attention_row_probs",
    "attention_row_probs_reference",
    "biased_attention",
    "biased_attention_reference",
    "compact_kv",
    "compact_kv_reference",
    "head_sparse_decode_attention",
    "head_sparse_decode_attention_reference",
    "head_sparse_decode_attention_torch",
    "interpreter_active",
    "triton_available",
]
