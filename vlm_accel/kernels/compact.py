"""Multi-layer KV-cache compaction by index (op ``vlm_accel::compact_kv``).

For methods that also drop tokens from *earlier* layers' caches (visual-token exit, DyVTE-style removal, video
reuse): every tensor ``t [B,H,S,D]`` in ``tensors`` (K and V of every layer) becomes
``t[b, :, index[b, j], :]`` → ``[B,H,S',D]``. Ragged kept counts are handled by the caller: left-pad
``index`` to ``S'`` with any valid position (e.g. 0) and carry a 2-D mask for those slots. Indices must lie
in ``[0, S)`` (``index_select`` raises otherwise; the Triton path does not check).

Reference (the default everywhere): one flat row index over ``[B·H·S, D]`` built once per distinct ``(H, S)``,
then one ``index_select`` per tensor — 4–8× faster than advanced indexing or ``torch.gather`` with an expanded
index (research/kernels.md §2.4). The Triton path copies all tensors in one launch through a pointer table; it
only saves launch overhead (≤ ~20 % on large caches), so it stays opt-in until a GPU benchmark shows it pays.
"""

import torch

from ._dispatch import resolve_use_triton, triton_runs_on

__all__ = ["compact_kv", "compact_kv_reference"]


def _check(tensors: list[torch.Tensor], index: torch.Tensor) -> None:
    if index.dim() != 2 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be an integer [B, S'] tensor, got {index.dtype} {tuple(index.shape)}")
    for i, t in enumerate(tensors):
        if t.dim() != 4 or t.shape[0] != index.shape[0]:
            raise ValueError(f"tensors[{i}] must be [B,H,S,D] with B={index.shape[0]}, got {tuple(t.shape)}")
        if t.device != index.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but index is on {index.device}")


def _flat_index(index: torch.Tensor, h: int, s: int) -> torch.Tensor:
    """Row ids into ``t.reshape(B·H·S, D)`` for output rows ``(b, h, j)`` in order."""
    b, s_out = index.shape
    base = torch.arange(b * h, device=index.device, dtype=torch.int64).view(b, h, 1) * s
    return (base + index.to(torch.int64).view(b, 1, s_out)).reshape(-1)


def compact_kv_reference(tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Pure-torch :func:`compact_kv`: flat ``index_select`` per tensor, flat index built once per geometry."""
    _check(tensors, index)
    flat: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for t in tensors:
        b, h, s, d = t.shape
        fi = flat.get((h, s))
        if fi is None:
            fi = flat[(h, s)] = _flat_index(index, h, s)
        out.append(t.reshape(b * h * s, d).index_select(0, fi).view(b, h, index.shape[1], d))
    return out


def _triton_ok(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return False
    t0 = tensors[0]
    return all(
        t.shape == t0.shape and t.dtype == t0.dtype and t.is_contiguous() for t in tensors
    ) and t0.element_size() in (1, 2, 4, 8)


def _triton(tensors, index):
    from ._triton import compact as tk

    return tk.compact_kv_triton(tensors, index)


@torch.library.custom_op("vlm_accel::compact_kv", mutates_args=())
def _op(tensors: list[torch.Tensor], index: torch.Tensor, use_triton: bool) -> list[torch.Tensor]:
    # CPU: Triton only under the interpreter (tests); otherwise the reference
    if tensors and triton_runs_on(index.device, use_triton) and _triton_ok(tensors):
        return _triton(tensors, index)
    return compact_kv_reference(tensors, index)


@_op.register_kernel("cuda")
def _op_cuda(tensors, index, use_triton):
    if use_triton and _triton_ok(tensors):
        return _triton(tensors, index)
    return compact_kv_reference(tensors, index)


@_op.register_fake
def _op_fake(tensors, index, use_triton):
    return [t.new_empty((t.shape[0], t.shape[1], index.shape[1], t.shape[3])) for t in tensors]


def compact_kv(
    tensors: list[torch.Tensor], index: torch.Tensor, *, use_triton: bool | None = None
) -> list[torch.Tensor]:
    """Gather ``index [B,S']`` along the sequence dim of every ``[B,H,S,D]`` tensor → ``[B,H,S',D]`` each.

    Args:
        tensors: K and V of the layers to compact; they must share B (H, S, D may differ between tensors).
        index: kept positions per batch row (int64/int32, same device), original order preserved by the
            caller.
        use_triton: one pointer-table launch for all tensors (same shape/dtype, contiguous); None ⇒ the
            ``VLM_ACCEL_TRITON`` environment flag. Default: the torch reference.

    Returns new tensors; the inputs are untouched (drop them to free memory layer by layer).
    """
    tensors = list(tensors)
    _check(tensors, index)
    if not tensors:
        return []
    return list(_op(tensors, index, resolve_use_triton(use_triton)))
