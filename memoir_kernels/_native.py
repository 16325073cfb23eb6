"""Loader for the compiled extension ``memoir_kernels._C``.

The extension is optional: a machine without a compiler still runs the PyTorch references. The
reason an import failed is kept and only shown when a native-only path is explicitly requested,
or once as a warning when ``auto`` silently falls back.
"""

from __future__ import annotations

import importlib
import warnings

import torch

__all__ = ["native_available", "native_unavailable_reason", "native_has_cuda"]

# Every op the compiled extension registers; a build missing one (older sources) counts as unavailable.
_NATIVE_OPS = ("mask_search_native", "mask_search_topk_native")
_state: dict = {"loaded": None, "reason": None, "warned": False, "has_cuda": False}


def _import_extension() -> None:
    # Done once, when this module is imported, so that the backend checks below are plain reads of
    # Python state that torch.compile can trace (it refuses to trace an import).
    try:
        importlib.import_module("memoir_kernels._C")
        missing = [op for op in _NATIVE_OPS if not hasattr(torch.ops.memoir, op)]
        _state["loaded"] = not missing
        if missing:
            _state["reason"] = (
                f"memoir_kernels._C imported but registered no memoir::{missing[0]} op (built from older "
                "sources? rebuild with `pip install --no-build-isolation -e .`)"
            )
        else:
            _state["has_cuda"] = bool(torch.ops.memoir.has_cuda())
    except ImportError as error:  # not built, or built against another torch
        _state["loaded"] = False
        _state["reason"] = f"memoir_kernels._C could not be imported ({error})"


def _load() -> bool:
    return _state["loaded"]


def native_available(device: torch.device) -> bool:
    """True when the compiled mask searches can run on tensors of ``device``."""
    if not _load():
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and native_has_cuda()


def native_has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _load() and _state["has_cuda"]


def native_unavailable_reason(device: torch.device) -> str:
    """Why the compiled path cannot run on ``device`` (empty string when it can)."""
    if not _load():
        return _state["reason"]
    if device.type == "cuda" and not native_has_cuda():
        return "memoir_kernels._C was built without CUDA (no nvcc or torch without CUDA at build time)"
    if device.type not in ("cpu", "cuda"):
        return f"no compiled kernel for device type {device.type!r}"
    return ""


def warn_fallback_once(device: torch.device) -> None:
    """Say once per process why ``auto`` is using a slower path."""
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"memoir_kernels: using the PyTorch mask search: {native_unavailable_reason(device)}",
            RuntimeWarning,
            stacklevel=3,
        )


_import_extension()
