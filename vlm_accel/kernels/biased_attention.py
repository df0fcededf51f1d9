"""Attention with a per-key additive logit bias (op ``vlm_accel::biased_attention``).

For hallucination-mitigation reweighting (PAI/GIFT/TTF-style visual-key emphasis, post-softmax ×w as
``+log w``) and any method whose ``attention_bias`` is a vector over key columns::

    out[b,h,m] = softmax(scaling · q[b,h,m] · K[b,h//G]ᵀ + key_bias[b, h or 0, :]  over allowed keys) ·
    V[b,h//G]

``allowed`` is a bool ``[B,M,N]`` mask and/or ``is_causal`` (bottom-right aligned: query row ``m`` sits at
absolute position ``N - M + m``, as in decode with a cache and FlashAttention ≥ 2.1). Rows with no allowed
key give 0.

The reference materialises the ``[B,Hb,M,N]`` float mask and calls SDPA (stock path; a float mask makes CUDA
SDPA leave the Flash backend). The Triton path is a flash-attention forward that adds the bias per key tile
and builds the causal/bool mask per tile, so no ``[B,1,M,N]`` float tensor exists.
"""

import torch
import torch.nn.functional as F

from ._dispatch import offsets_fit_int32, resolve_use_triton, triton_runs_on
from ._reference import NEG_INF, causal_allowed, check_gqa, check_mask

__all__ = ["biased_attention", "biased_attention_reference"]


def _check(query, key, value, key_bias, allowed) -> None:
    b, hq, _, _, m, n = check_gqa(query, key)
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value {tuple(value.shape)} must match key {tuple(key.shape)} in B, H, N")
    if value.shape[-1] != query.shape[-1]:
        raise ValueError("value head dim must equal the query head dim")
    if (
        key_bias.dim() != 3
        or key_bias.shape[0] != b
        or key_bias.shape[1] not in (1, hq)
        or key_bias.shape[2] != n
    ):
        raise ValueError(
            f"key_bias must be [B, 1 or Hq, N] = [{b}, 1|{hq}, {n}], got {tuple(key_bias.shape)}"
        )
    if not key_bias.is_floating_point():
        raise TypeError("key_bias must be floating point")
    check_mask(allowed, (b, m, n), "allowed")


def _full_allowed(
    allowed: torch.Tensor | None, is_causal: bool, m: int, n: int, device: torch.device
) -> torch.Tensor | None:
    if not is_causal:
        return allowed
    causal = causal_allowed(m, n, device)[None]
    return causal if allowed is None else allowed & causal


def biased_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    allowed: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
) -> torch.Tensor:
    """SDPA with a materialised float mask ``key_bias[:, :, None, :]`` + ``-inf`` where not allowed."""
    _check(query, key, value, key_bias, allowed)
    b, hq, m, _ = query.shape
    n = key.shape[2]
    ok = _full_allowed(allowed, is_causal, m, n, query.device)
    mask = key_bias.to(torch.float32)[:, :, None, :].expand(b, key_bias.shape[1], m, n)
    if ok is not None:
        mask = mask.masked_fill(~ok[:, None], NEG_INF)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask.to(query.dtype), scale=scaling, enable_gqa=key.shape[1] != hq
    )
    if ok is not None:
        out = torch.where(
            ok.any(dim=-1)[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device)
        )
    return out


def _eligible(query, key, value, key_bias, allowed) -> bool:
    return (
        query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and 1 <= query.shape[-1] <= 256
        and query.numel() > 0
        and key.numel() > 0
        and offsets_fit_int32(query, key, value, key_bias, allowed)
    )


def _triton(query, key, value, key_bias, allowed, is_causal, scaling):
    from ._triton import biased_attention as tk

    return tk.biased_attention_triton(query, key, value, key_bias, allowed, is_causal, scaling)


@torch.library.custom_op("vlm_accel::biased_attention", mutates_args=())
def _op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    allowed: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    use_triton: bool,
) -> torch.Tensor:
    # CPU: Triton only under the interpreter (tests); otherwise the reference
    if triton_runs_on(query.device, use_triton) and _eligible(query, key, value, key_bias, allowed):
        return _triton(query, key, value, key_bias, allowed, is_causal, scaling)
    return biased_attention_reference(query, key, value, key_bias, allowed, is_causal, scaling)


@_op.register_kernel("cuda")
def _op_cuda(query, key, value, key_bias, allowed, is_causal, scaling, use_triton):
    if use_triton and _eligible(query, key, value, key_bias, allowed):
        return _triton(query, key, value, key_bias, allowed, is_causal, scaling)
    return biased_attention_reference(query, key, value, key_bias, allowed, is_causal, scaling)


@_op.register_fake
def _op_fake(query, key, value, key_bias, allowed, is_causal, scaling, use_triton):
    return torch.empty_like(query)


def biased_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    allowed: torch.Tensor | None = None,
    is_causal: bool = False,
    scaling: float | None = None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Attention ``[B,Hq,M,D]`` with an additive fp32 bias per key column (per head or shared).

    Args:
        query: ``[B,Hq,M,D]`` post-RoPE queries.
        key, value: ``[B,Hkv,N,D]`` (pre-``repeat_kv``), ``Hq = Hkv·G``.
        key_bias: ``[B,Hq,N]`` or ``[B,1,N]`` additive logit bias (finite; use ``allowed`` to exclude keys).
        allowed: bool ``[B,M,N]``; None ⇒ all keys (subject to ``is_causal``).
        is_causal: also mask keys after each query's absolute position ``N - M + m`` (bottom-right aligned).
        scaling: logit scale; default ``D ** -0.5``.
        use_triton: None ⇒ the ``VLM_ACCEL_TRITON`` environment flag; default the torch reference.
    """
    _check(query, key, value, key_bias, allowed)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return _op(
        query, key, value, key_bias, allowed, bool(is_causal), float(scaling), resolve_use_triton(use_triton)
    )
