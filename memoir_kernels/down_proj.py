"""The edited down projection.

y_t = W0 a_t (+ bias) + gate[r_t] * W_m^T (mask[r_t] * a_t),  r_t = row_of_token[t],
with W0 ``[d, D]`` (nn.Linear layout) and W_m stored ``[D, d]`` so a selected column is one row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._bits import unpack_bits
from .backend import resolve_backend

__all__ = ["memoir_down_proj", "memoir_down_proj_reference", "masked_residual"]


def masked_residual(a: torch.Tensor, memory: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """Residual ``(mask * a) @ W_m`` for ``a [T, D]``, ``memory [D, d]``, ``token_masks [T, D]`` bool."""
    return (a * token_masks.to(a.dtype)) @ memory.to(a.dtype)


def memoir_down_proj_reference(
    a: torch.Tensor,
    weight: torch.Tensor,
    memory: torch.Tensor,
    row_of_token: torch.Tensor,
    bits: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch edited down projection; same contract as :func:`memoir_down_proj`."""
    _check_inputs(a, weight, memory, row_of_token, bits, gate)
    base = F.linear(a, weight, bias)
    if bits.shape[0] == 0:
        return base
    token_masks = unpack_bits(bits, a.shape[1])[row_of_token]
    residual = masked_residual(a, memory, token_masks)
    # where() rather than gate * residual: an ungated token must equal the base output exactly.
    return torch.where(gate[row_of_token].unsqueeze(1), base + residual, base)


def memoir_down_proj(
    a: torch.Tensor,
    weight: torch.Tensor,
    memory: torch.Tensor,
    row_of_token: torch.Tensor,
    bits: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edited down projection of a flat batch of tokens.

    Args:
        a: ``[T, D]`` activations entering the down projection.
        weight: ``[d, D]`` base weight W0 (``nn.Linear`` layout).
        memory: ``[D, d]`` residual memory W_m (transposed layout: column i of W_m is row i here).
        row_of_token: ``[T]`` int64, the sequence (row of ``bits``/``gate``) each token belongs to.
        bits: ``[R, ceil(D / 64)]`` int64 packed masks, one per sequence.
        gate: ``[R]`` bool, whether each sequence uses the memory.
        bias: ``[d]`` or ``None``.

    Returns:
        ``[T, d]`` outputs in ``a``'s dtype.

    Example:
        >>> y = memoir_down_proj(a, layer.weight, memory, rows, bits, gate, layer.bias)
    """
    resolve_backend("memoir_down_proj", a.device)
    return memoir_down_proj_reference(a, weight, memory, row_of_token, bits, gate, bias)


def _check_inputs(a, weight, memory, row_of_token, bits, gate) -> None:
    tokens, dim = a.shape
    hidden = weight.shape[0]
    if weight.shape != (hidden, dim):
        raise ValueError(f"weight must be [d, {dim}], got {tuple(weight.shape)}")
    if memory.shape != (dim, hidden):
        raise ValueError(f"memory must be [{dim}, {hidden}], got {tuple(memory.shape)}")
    if row_of_token.shape != (tokens,) or row_of_token.dtype != torch.int64:
        raise ValueError(f"row_of_token must be int64 [{tokens}], got {row_of_token.dtype} {tuple(row_of_token.shape)}")
    if bits.dim() != 2 or gate.shape != (bits.shape[0],) or gate.dtype != torch.bool:
        raise ValueError(f"gate must be bool [R] matching bits [R, W]; got {tuple(gate.shape)} and {tuple(bits.shape)}")
