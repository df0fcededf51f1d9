"""Independent dense-eager computations the kernel tests compare against (fp64, repeat_kv, nan→0 softmax).

Deliberately written the "obvious" way (materialise everything, expand heads with ``repeat_interleave``) so it
shares no code with :mod:`vlm_accel.kernels`.
"""

import torch

# (B, Hq, Hkv, M, N, D): GQA and MHA, odd N and D, M = 1 (decode/FastV) and M > 1.
ROW_SHAPES = [(2, 4, 2, 3, 37, 24), (1, 6, 2, 5, 70, 40), (2, 3, 3, 1, 19, 16)]
DECODE_SHAPES = [(3, 6, 2, 300, 40), (2, 4, 4, 37, 24), (1, 8, 1, 20, 72)]  # (B, Hq, Hkv, N, D)
ATTN_SHAPES = [(2, 6, 2, 5, 70, 40), (2, 4, 4, 1, 37, 24), (1, 4, 2, 9, 9, 16)]  # (B, Hq, Hkv, M, N, D)

# Absolute tolerances: probabilities (values in [0, 1]) and attention outputs (|v| ~ 1, output dtype
# rounding).
PROB_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
OUT_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, g: torch.Generator, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def padded_mask(b: int, m: int, n: int, g: torch.Generator, device="cpu") -> torch.Tensor:
    """Random key mask with left padding per batch row and one fully masked query row (row 0 of sample 0)."""
    allowed = torch.rand((b, m, n), generator=g) > 0.25
    for i in range(b):
        allowed[i, :, : (3 * i) % max(n, 1)] = False  # left padding, different per sample
    allowed[0, 0] = False
    return allowed.to(device)


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.double().repeat_interleave(hq // x.shape[1], dim=1)


def row_probs(query, key, allowed, scaling) -> torch.Tensor:
    """``[B,Hq,M,N]`` fp64 probabilities; masked keys 0, rows with nothing allowed 0."""
    s = query.double() @ expand_kv(key, query.shape[1]).transpose(-1, -2) * scaling
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def reduce_probs(p: torch.Tensor, reduce: str) -> torch.Tensor:
    return {"none": p, "head_mean": p.mean(dim=1), "sum": p.sum(dim=(1, 2))}[reduce]


def attention(query, key, value, scaling, key_bias=None, allowed=None, causal=False, head_mask=None):
    """Dense fp64 attention with optional ``[B,Hb,N]`` bias, ``[B,M,N]`` mask, bottom-right causal, head
    mask."""
    b, hq, m, _ = query.shape
    n = key.shape[2]
    s = query.double() @ expand_kv(key, hq).transpose(-1, -2) * scaling
    if key_bias is not None:
        s = s + key_bias.double()[:, :, None, :]
    ok = torch.ones((b, m, n), dtype=torch.bool, device=query.device)
    if allowed is not None:
        ok &= allowed
    if causal:
        ok &= (
            torch.arange(n, device=query.device)[None, :]
            <= torch.arange(m, device=query.device)[:, None] + n - m
        )
    s = s.masked_fill(~ok[:, None], float("-inf"))
    out = torch.softmax(s, dim=-1).nan_to_num(0.0) @ expand_kv(value, hq)
    if head_mask is not None:
        out = out * head_mask[:, :, None, None]
    return out
