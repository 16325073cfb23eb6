"""The one backend switch: ``MEMOIR_BACKEND=auto|native|triton|torch``, read once.

``native`` means the compiled extension (CUDA kernels for GPU tensors, their C++ twin for CPU
tensors; ``cuda`` is accepted as its older name); ``triton`` the Triton kernels; ``torch`` the
pure-PyTorch references. ``auto`` picks the fastest implementation available for an op and device
and falls back silently (with one warning naming the reason); an explicit choice that cannot run
raises with the reason. Ops that have no implementation of the requested kind at all use their
best available one.

The environment variable is read on first use; :func:`set_backend` and :func:`use_backend` change
the choice at run time (the ops never read the environment per call).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ._native import native_available, native_unavailable_reason, warn_fallback_once
from ._triton import triton_unavailable_reason

__all__ = ["BACKENDS", "requested_backend", "resolve_backend", "available_backends", "set_backend", "use_backend"]

BACKENDS = ("auto", "native", "triton", "torch")
_ALIASES = {"cuda": "native"}  # the name ``native`` had before it covered the C++ CPU kernels too
# Implementations each op has, fastest first.
_OP_IMPLEMENTATIONS = {
    "mask_search": ("native", "torch"),
    "mask_search_topk": ("native", "torch"),
    "tophash": ("triton", "torch"),
    "memoir_down_proj": ("triton", "torch"),
    "tophash_residual": ("triton", "torch"),
}
_requested: str | None = None  # None until the environment is read


def _parse(name: str, source: str) -> str:
    name = (name or "auto").strip().lower() or "auto"
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not one of {', '.join(BACKENDS)} (or the alias cuda)")
    return name


def requested_backend() -> str:
    """The backend asked for: :func:`set_backend`'s, else ``MEMOIR_BACKEND`` (default ``auto``)."""
    global _requested
    if _requested is None:
        _requested = _parse(os.environ.get("MEMOIR_BACKEND", "auto"), "MEMOIR_BACKEND")
    return _requested


def set_backend(name: str | None) -> str | None:
    """Use backend ``name`` (``auto``, ``native``, ``triton``, ``torch``; ``None``: read
    ``MEMOIR_BACKEND`` again on next use) from now on; returns the previous choice."""
    global _requested
    previous, _requested = _requested, None if name is None else _parse(name, "backend")
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: backend ``name`` within the block, the previous choice after it."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _unavailable_reason(op: str, backend: str, device: torch.device) -> str:
    if backend not in _OP_IMPLEMENTATIONS[op]:
        return f"{op} has no {backend} implementation yet"
    if backend == "native":
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
    # An op with no implementation of the requested kind by design (say, native for an op that only
    # has a Triton kernel) uses its best available one; only an implementation that exists but
    # cannot run here is an error.
    if wanted != "auto" and wanted in _OP_IMPLEMENTATIONS[op]:
        reason = _unavailable_reason(op, wanted, device)
        if reason:
            raise RuntimeError(f"the MEMOIR backend {wanted} cannot run {op} on {device}: {reason}")
        return wanted
    # auto (or a kind this op lacks): Triton only on GPUs; on CPU it would mean the interpreter.
    choices = [b for b in available_backends(op, device) if not (b == "triton" and device.type != "cuda")]
    if "native" in _OP_IMPLEMENTATIONS[op] and "native" not in choices and not native_available(device):
        warn_fallback_once(device)
    return choices[0]
