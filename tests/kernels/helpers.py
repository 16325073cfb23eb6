"""Shared helpers for the kernel tests."""

import torch


def kernel_device() -> str:
    """Where the Triton kernels run: the GPU when there is one, else the CPU under TRITON_INTERPRET."""
    return "cuda" if torch.cuda.is_available() else "cpu"
