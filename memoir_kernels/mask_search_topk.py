"""The r nearest stored masks: top-r over the bank of popcount(query AND mask).

index[b] lists the r bank rows of largest popcount(q[b] & bank[n]), ordered by overlap descending
and, on equal overlap, by index ascending (so entry 0 is what :func:`mask_search` returns);
overlap[b] holds their overlaps. Entries past the bank's rows (N < r, N may be 0) are index -1,
overlap 0.
"""

from __future__ import annotations

import torch

from ._bits import popcount_bytes
from ._native import native_available
from .backend import requested_backend, resolve_backend
from .mask_search import _check_inputs

__all__ = ["mask_search_topk", "mask_search_topk_reference"]

# Bank rows compared per step in the reference, so memory stays bounded for 100k-mask banks.
_REFERENCE_CHUNK = 4096
# Largest r the CUDA kernel takes (MEMOIR_TOPK_CUDA_MAX_R in csrc/mask_search.h).
CUDA_MAX_R = 64


def mask_search_topk_reference(
    query_bits: torch.Tensor, bank_bits: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch top-r mask search; same contract as :func:`mask_search_topk`.

    The bank is scored chunk by chunk; after each chunk the running top-r and the chunk's rows are
    ranked together with a stable sort on overlap. The running list holds lower indices than the
    chunk and is itself in (overlap desc, index asc) order, and the chunk's rows are in index
    order, so the stable sort keeps equal overlaps in ascending index. Unfilled slots rank below
    every real row, including rows of overlap 0; they start as the r slots of the list, so the
    result always has r columns and slots no row filled stay (-1, 0).
    """
    _check_inputs(query_bits, bank_bits)
    _check_r(r)
    batch, num_masks = query_bits.shape[0], bank_bits.shape[0]
    device = query_bits.device
    best_overlap = torch.zeros(batch, r, dtype=torch.int32, device=device)
    best_index = torch.full((batch, r), -1, dtype=torch.int64, device=device)
    for start in range(0, num_masks, _REFERENCE_CHUNK):
        chunk = bank_bits[start : start + _REFERENCE_CHUNK]
        overlap = popcount_bytes(query_bits.unsqueeze(1) & chunk.unsqueeze(0))  # [B, n]
        rows = torch.arange(start, start + chunk.shape[0], dtype=torch.int64, device=device)
        candidate_overlap = torch.cat([best_overlap, overlap], dim=1)
        candidate_index = torch.cat([best_index, rows.expand(batch, -1)], dim=1)
        rank_key = torch.where(candidate_index >= 0, candidate_overlap, -1)
        order = torch.sort(rank_key, dim=1, descending=True, stable=True).indices[:, :r]
        best_overlap = candidate_overlap.gather(1, order)
        best_index = candidate_index.gather(1, order)
    return best_index, best_overlap


def mask_search_topk(query_bits: torch.Tensor, bank_bits: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Find, for every query mask, the ``r`` stored masks it overlaps most.

    Args:
        query_bits: ``[B, W]`` int64 packed query masks.
        bank_bits: ``[N, W]`` int64 packed stored masks (``N`` may be 0).
        r: how many masks to return per query, an int ``>= 1`` (at most 64 for CUDA tensors under
            ``MEMOIR_BACKEND=native``; ``auto`` uses the PyTorch reference beyond that).

    Returns:
        ``(index [B, r] int64, overlap [B, r] int32)``: per query the rows of largest overlap
        (number of common set bits), overlap descending, ties to the lower index; entry 0 equals
        :func:`mask_search`'s answer. Entries past the bank's ``N`` rows are ``(-1, 0)``.

    Example:
        >>> index, overlap = mask_search_topk(query_bits, bank.bits, r=4)  # both [B, 4]
        >>> nearest = index[:, 0]  # the same as mask_search(query_bits, bank.bits)[0]
    """
    _check_inputs(query_bits, bank_bits)
    _check_r(r)
    device = query_bits.device
    if (device.type == "cuda" and r > CUDA_MAX_R and requested_backend() == "native"
            and resolve_backend("mask_search_topk", device) == "native"):
        raise ValueError(f"mask_search_topk: the CUDA kernel takes r <= {CUDA_MAX_R}, got r={r}; "
                         "use MEMOIR_BACKEND=auto or torch for larger r")
    return torch.ops.memoir.mask_search_topk(query_bits, bank_bits, r)


# ------------------------------------------------------------------------------ the registered op
# memoir::mask_search_topk: the PyTorch reference for every device; CPU and CUDA tensors take the
# compiled search where the backend switch says native (on CUDA for r up to its limit).
@torch.library.custom_op("memoir::mask_search_topk", mutates_args=())
def _mask_search_topk_op(query_bits: torch.Tensor, bank_bits: torch.Tensor, r: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_search_topk_reference(query_bits, bank_bits, r)


@_mask_search_topk_op.register_kernel(("cpu", "cuda"))
def _(query_bits: torch.Tensor, bank_bits: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = query_bits.device
    native = resolve_backend("mask_search_topk", device) == "native" and native_available(device)
    if native and not (device.type == "cuda" and r > CUDA_MAX_R):
        return torch.ops.memoir.mask_search_topk_native(query_bits.contiguous(), bank_bits.contiguous(), r)
    return mask_search_topk_reference(query_bits, bank_bits, r)


@_mask_search_topk_op.register_fake
def _(query_bits, bank_bits, r):
    batch = query_bits.shape[0]
    return query_bits.new_empty(batch, r, dtype=torch.int64), query_bits.new_empty(batch, r, dtype=torch.int32)


def _check_r(r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
