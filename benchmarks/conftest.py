"""Benchmark helpers: machine description for extra_info."""

import platform
import subprocess

import pytest
import torch


def machine_info() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "git_sha": sha,
            "threads": torch.get_num_threads()}


@pytest.fixture()
def record(benchmark):
    """Attach the machine and derived numbers to the benchmark's extra_info."""

    def _record(**values):
        benchmark.extra_info.update(machine_info())
        benchmark.extra_info.update(values)

    return _record
