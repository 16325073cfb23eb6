"""TopHash: the binary mask of a sequence, from its prompt-token activations.

key = mean_{t in window} a_t - mu;  S = top-k of |key| (larger |value| first, then lower index);
mask = {perm[i] : i in S}, packed into int64 words.
"""

from __future__ import annotations

import torch

from ._bits import pack_bits
from .backend import resolve_backend

__all__ = ["prompt_keys", "tophash", "tophash_from_keys", "tophash_reference"]


def prompt_keys(acts: torch.Tensor, window: torch.Tensor, mu: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``acts [B, T, D]`` over the tokens where ``window [B, T]`` is true, minus ``mu [D]``.

    Computed in fp32 whatever the input dtype. A row with an empty window gets the zero mean (its
    key is then ``-mu``) rather than NaN, so one bad row cannot poison a batch.

    Returns keys ``[B, D]`` (fp32).
    """
    _check_acts(acts, window)
    weights = window.to(torch.float32)
    count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    summed = torch.einsum("bt,btd->bd", weights, acts.to(torch.float32))
    keys = summed / count
    if mu is not None:
        keys = keys - mu.to(torch.float32)
    return keys


def tophash_from_keys(keys: torch.Tensor, perm: torch.Tensor, k: int) -> torch.Tensor:
    """Packed TopHash masks ``[B, W]`` of keys ``[B, D]`` (reference).

    Ties in ``|key|`` go to the lower index: a stable descending sort keeps equal values in index
    order, which is the contract every kernel must reproduce.
    """
    batch, dim = keys.shape
    if not 0 < k <= dim:
        raise ValueError(f"top_k must be in [1, {dim}], got {k}")
    if perm.shape != (dim,):
        raise ValueError(f"perm must have shape [{dim}], got {tuple(perm.shape)}")
    order = torch.sort(keys.abs(), dim=1, descending=True, stable=True).indices
    selected = perm.to(keys.device)[order[:, :k]]
    mask = torch.zeros(batch, dim, dtype=torch.bool, device=keys.device)
    mask.scatter_(1, selected, True)
    return pack_bits(mask)


def tophash_reference(
    acts: torch.Tensor, window: torch.Tensor, mu: torch.Tensor | None, perm: torch.Tensor, k: int
) -> torch.Tensor:
    """Pure-PyTorch TopHash of ``acts [B, T, D]`` over ``window [B, T]``; returns bits ``[B, W]``."""
    return tophash_from_keys(prompt_keys(acts, window, mu), perm, k)


def tophash(
    acts: torch.Tensor, window: torch.Tensor, mu: torch.Tensor | None, perm: torch.Tensor, k: int
) -> torch.Tensor:
    """TopHash masks of a batch of sequences.

    Args:
        acts: ``[B, T, D]`` token activations (any float dtype).
        window: ``[B, T]`` bool, true on the prompt tokens that enter the key (padding excluded).
        mu: ``[D]`` background mean subtracted from the key, or ``None``.
        perm: ``[D]`` int64 permutation of ``0..D-1``.
        k: number of positions set in every mask.

    Returns:
        ``[B, ceil(D / 64)]`` int64 packed masks.

    Example:
        >>> bits = tophash(acts, attention_mask.bool(), mu, perm, k=439)
    """
    resolve_backend("tophash", acts.device)  # only the reference exists for this op so far
    return tophash_reference(acts, window, mu, perm, k)


def _check_acts(acts: torch.Tensor, window: torch.Tensor) -> None:
    if acts.dim() != 3:
        raise ValueError(f"acts must be [B, T, D], got shape {tuple(acts.shape)}")
    if window.shape != acts.shape[:2]:
        raise ValueError(f"window must be [B, T] = {tuple(acts.shape[:2])}, got {tuple(window.shape)}")
    if window.dtype != torch.bool:
        raise TypeError(f"window must be bool, got {window.dtype}")
