"""The one backend switch: ``MEMOIR_BACKEND=auto|cuda|triton|torch``.

``cuda`` means the compiled extension (CUDA kernels for GPU tensors, their C++ twin for CPU
tensors); ``triton`` the Triton kernels; ``torch`` the pure-PyTorch references. ``auto`` picks the
fastest implementation available for an op and device and falls back silently (with one warning
naming the reason); an explicit choice that cannot run raises with the reason. Ops that have no
implementation of the requested kind at all use their best available one.
"""

from __future__ import annotations

import os

import torch

from ._native import native_available, native_unavailable_reason, warn_fallback_once
from ._triton import triton_unavailable_reason

__all__ = ["BACKENDS", "requested_backend", "resolve_backend", "available_backends"]

BACKENDS = ("auto", "cuda", "triton", "torch")
# Implementations each op has, fastest first.
_OP_IMPLEMENTATIONS = {
    "mask_search": ("cuda", "torch"),
    "mask_search_topk": ("cuda", "torch"),
    "tophash": ("triton", "torch"),
    "memoir_down_proj": ("triton", "torch"),
    "tophash_residual": ("triton", "torch"),
}


def requested_backend() -> str:
    """The backend named by ``MEMOIR_BACKEND`` (default ``auto``); raises on an unknown name."""
    name = os.environ.get("MEMOIR_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MEMOIR_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def _unavailable_reason(op: str, backend: str, device: torch.device) -> str:
    if backend not in _OP_IMPLEMENTATIONS[op]:
        return f"{op} has no {backend} implementation yet"
    if backend == "cuda":
        return native_unavailable_reason(device)
    if backend == "triton":
        return triton_unavailable_reason(device)
    return ""


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends that can run ``op`` on ``device`` right now, fastest first."""
    device = torch.device(device)
    return [b for b in _OP_IMPLEMENTATIONS[op] if not _unavailable_reason(op, b, device)]


def resolve_backend(op: str, device: torch.device | str) -> str:
    """The implementation ``op`` uses on ``device`` under the current ``MEMOIR_BACKEND``."""
    device = torch.device(device)
    wanted = requested_backend()
    # An op with no implementation of the requested kind by design (say, CUDA for an op that only
    # has a Triton kernel) uses its best available one; only an implementation that exists but
    # cannot run here is an error.
    if wanted != "auto" and wanted in _OP_IMPLEMENTATIONS[op]:
        reason = _unavailable_reason(op, wanted, device)
        if reason:
            raise RuntimeError(f"MEMOIR_BACKEND={wanted} cannot run {op} on {device}: {reason}")
        return wanted
    # auto (or a kind this op lacks): Triton only on GPUs; on CPU it would mean the interpreter.
    choices = [b for b in available_backends(op, device) if not (b == "triton" and device.type != "cuda")]
    if "cuda" in _OP_IMPLEMENTATIONS[op] and "cuda" not in choices and not native_available(device):
        warn_fallback_once(device)
    return choices[0]
