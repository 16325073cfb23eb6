"""Whether the Triton kernels can run, and why not.

Triton runs on CUDA tensors, or on CPU tensors under its interpreter (``TRITON_INTERPRET=1``, set
before the kernels are defined: the CI's way to test them without a GPU). ``auto`` never picks the
interpreter, which is orders of magnitude slower than the PyTorch references.
"""

from __future__ import annotations

import os

import torch

__all__ = ["HAS_TRITON", "triton_unavailable_reason", "interpreting"]

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    from torch.library import triton_op, wrap_triton  # noqa: F401

    HAS_TRITON = True
    _IMPORT_ERROR = ""
except ImportError as error:  # no triton wheel, or a torch without triton_op
    HAS_TRITON = False
    _IMPORT_ERROR = f"triton could not be imported ({error})"

# Read once: Triton itself reads the variable when the kernels are defined, so a later change
# would not switch the kernels to the interpreter anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when the Triton kernels run in the CPU interpreter."""
    return _INTERPRET


def triton_unavailable_reason(device: torch.device) -> str:
    """Why the Triton kernels cannot run on ``device`` (empty string when they can)."""
    if not HAS_TRITON:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return "" if not _INTERPRET else "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
    if device.type == "cpu":
        return "" if _INTERPRET else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"no Triton kernels for device type {device.type!r}"
