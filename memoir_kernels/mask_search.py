"""Nearest stored mask: arg-max over the bank of popcount(query AND mask).

index[b] = argmax_n popcount(q[b] & bank[n]) (ties to the lowest n), overlap[b] = that popcount;
an empty bank gives index -1 and overlap 0.
"""

from __future__ import annotations

import torch

from ._bits import popcount_bytes
from ._native import native_available
from .backend import resolve_backend

__all__ = ["mask_search", "mask_search_reference"]

# Bank rows compared per step in the reference, so memory stays bounded for 100k-mask banks.
_REFERENCE_CHUNK = 4096


def mask_search_reference(query_bits: torch.Tensor, bank_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch mask search; same contract as :func:`mask_search`."""
    _check_inputs(query_bits, bank_bits)
    batch, num_masks = query_bits.shape[0], bank_bits.shape[0]
    best_overlap = torch.zeros(batch, dtype=torch.int32, device=query_bits.device)
    best_index = torch.full((batch,), -1, dtype=torch.int64, device=query_bits.device)
    for start in range(0, num_masks, _REFERENCE_CHUNK):
        chunk = bank_bits[start : start + _REFERENCE_CHUNK]
        overlap = popcount_bytes(query_bits.unsqueeze(1) & chunk.unsqueeze(0))  # [B, n]
        chunk_overlap, chunk_index = overlap.max(dim=1)  # max returns the first maximum
        # Strictly greater: an equal overlap in a later chunk loses to the earlier index.
        better = (chunk_overlap > best_overlap) | (best_index < 0)
        best_overlap = torch.where(better, chunk_overlap, best_overlap)
        best_index = torch.where(better, chunk_index + start, best_index)
    return best_index, best_overlap


def mask_search(query_bits: torch.Tensor, bank_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Find, for every query mask, the stored mask it overlaps most.

    Args:
        query_bits: ``[B, W]`` int64 packed query masks.
        bank_bits: ``[N, W]`` int64 packed stored masks (``N`` may be 0).

    Returns:
        ``(index [B] int64, overlap [B] int32)``: the lowest index of maximal overlap and that
        overlap (number of common set bits); ``(-1, 0)`` for an empty bank.

    Example:
        >>> index, overlap = mask_search(query_bits, bank.bits)
    """
    _check_inputs(query_bits, bank_bits)
    return torch.ops.memoir.mask_search(query_bits, bank_bits)


# ------------------------------------------------------------------------------ the registered op
# memoir::mask_search: the PyTorch reference is the kernel for every device; CPU and CUDA tensors
# take the compiled search where the backend switch says native. Fake: shapes for tracing.
@torch.library.custom_op("memoir::mask_search", mutates_args=())
def _mask_search_op(query_bits: torch.Tensor, bank_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_search_reference(query_bits, bank_bits)


@_mask_search_op.register_kernel(("cpu", "cuda"))
def _(query_bits: torch.Tensor, bank_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_backend("mask_search", query_bits.device) == "native" and native_available(query_bits.device):
        return torch.ops.memoir.mask_search_native(query_bits.contiguous(), bank_bits.contiguous())
    return mask_search_reference(query_bits, bank_bits)


@_mask_search_op.register_fake
def _(query_bits, bank_bits):
    batch = query_bits.shape[0]
    return query_bits.new_empty(batch, dtype=torch.int64), query_bits.new_empty(batch, dtype=torch.int32)


def _check_inputs(query_bits: torch.Tensor, bank_bits: torch.Tensor) -> None:
    for name, bits in (("query_bits", query_bits), ("bank_bits", bank_bits)):
        if bits.dtype != torch.int64 or bits.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int64 tensor, got {bits.dtype} {tuple(bits.shape)}")
    if query_bits.shape[1] != bank_bits.shape[1]:
        raise ValueError(f"query has {query_bits.shape[1]} words per mask, bank has {bank_bits.shape[1]}")
    if query_bits.device != bank_bits.device:
        raise ValueError(f"query on {query_bits.device}, bank on {bank_bits.device}")
