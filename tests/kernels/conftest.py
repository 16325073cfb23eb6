"""Fixtures of the kernel tests."""

import pytest
import torch

from .helpers import kernel_device


@pytest.fixture()
def triton_backend(monkeypatch):
    """Select the Triton backend for the test, or skip with the reason Triton cannot run here."""
    from memoir_kernels._triton import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device(kernel_device()))
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("MEMOIR_BACKEND", "triton")
