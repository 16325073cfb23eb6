"""Packed-bit layout shared by every op, file and kernel.

A mask over ``D`` positions is stored as ``W = ceil(D / 64)`` int64 words; position ``j`` lives in
word ``j // 64`` at bit ``j % 64``; padding bits past ``D`` are zero.
"""

from __future__ import annotations

import torch

__all__ = ["num_words", "pack_bits", "unpack_bits", "popcount_bytes"]

# popcount of every byte value, used by the reference search (torch has no int64 popcount).
_BYTE_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int32)


def _bit_values(device) -> torch.Tensor:
    """``[64]`` int64: the value of each bit of a word (bit 63 is the sign bit). Built per call, on
    the device, so that traced code (fake tensors, torch.compile) holds no constant from outside."""
    return torch.ones(64, dtype=torch.int64, device=device).bitwise_left_shift(
        torch.arange(64, dtype=torch.int64, device=device))


def num_words(dim: int) -> int:
    """Number of int64 words that hold ``dim`` bits."""
    return (dim + 63) // 64


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask ``[..., D]`` into int64 words ``[..., ceil(D / 64)]``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool mask, got {mask.dtype}")
    dim = mask.shape[-1]
    words = num_words(dim)
    padded = torch.zeros(*mask.shape[:-1], words * 64, dtype=torch.bool, device=mask.device)
    padded[..., :dim] = mask
    values = _bit_values(mask.device)
    grouped = padded.view(*mask.shape[:-1], words, 64).to(torch.int64)
    # Bits within a word are disjoint powers of two, so the sum is their OR (no carries).
    return (grouped * values).sum(dim=-1)


def unpack_bits(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """Unpack int64 words ``[..., W]`` into a boolean mask ``[..., dim]``."""
    if bits.dtype != torch.int64:
        raise TypeError(f"unpack_bits expects int64 words, got {bits.dtype}")
    if bits.shape[-1] != num_words(dim):
        raise ValueError(f"{bits.shape[-1]} words cannot hold exactly {dim} bits")
    values = _bit_values(bits.device)
    expanded = (bits.unsqueeze(-1) & values) != 0
    return expanded.reshape(*bits.shape[:-1], bits.shape[-1] * 64)[..., :dim]


def popcount_bytes(words: torch.Tensor) -> torch.Tensor:
    """Population count summed over the last dim of int64 words ``[..., W] -> [...]`` (int32)."""
    as_bytes = words.contiguous().view(torch.uint8).to(torch.int64)
    table = _BYTE_POPCOUNT.to(words.device)
    return table[as_bytes].sum(dim=-1, dtype=torch.int32)
