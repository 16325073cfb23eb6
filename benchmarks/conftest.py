"""Benchmark helpers: machine description for extra_info, device timing, copy bandwidth.

Every benchmark file runs its baseline in the same session and records derived numbers (GB/s,
% of the device's copy bandwidth) with :func:`record`. On GPU the timed callables synchronise
(:func:`synced`), so pytest-benchmark's wall clock is the latency a caller sees: kernels plus the
Python launch path and one synchronisation (about 10-20 us). Kernel-level numbers (GB/s, % of
copy bandwidth, kernel-vs-kernel ratios) come from :func:`device_seconds` instead, recorded as
``device_s`` in extra_info: a 10k-mask search moves 18 MB, a few microseconds of HBM traffic,
which the wall clock would bury under the launch path.
"""

import functools
import platform
import subprocess

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
            "threads": torch.get_num_threads(), "cuda": torch.version.cuda}


def synced(fn):
    """``fn`` followed by a device synchronisation when CUDA is in use (no-op on CPU)."""
    if not torch.cuda.is_available():
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


def device_seconds(fn, *args, reps: int = 50, **kwargs) -> float:
    """Median GPU time of one ``fn(*args, **kwargs)`` call, in seconds, from CUDA events.

    Before each call a 256 MiB buffer is zeroed, which evicts the inputs from L2 (a 10k-mask bank
    fits in an H100's 50 MB L2, so back-to-back calls would time L2, not HBM), and a device-side
    sleep is queued so the CPU has enqueued the whole call before the GPU reaches it: the events
    then bracket the kernels and the gaps between them, not the host's launch path.
    """
    flush = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    fn(*args, **kwargs)  # warm-up: compilation, autotuning, allocator
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        torch.cuda._sleep(1_000_000)  # ~0.5 ms: longer than any benchmarked call's launch path
        start.record()
        fn(*args, **kwargs)
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2] / 1e3


@functools.cache
def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second, GB/s)."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB: far above L2
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    return 2 * src.numel() / seconds / 1e9


@pytest.fixture()
def record(benchmark):
    """Attach the machine and derived numbers to the benchmark's extra_info."""

    def _record(**values):
        benchmark.extra_info.update(machine_info())
        if torch.cuda.is_available():
            benchmark.extra_info["copy_gb_per_s"] = copy_bandwidth_gbps()
        benchmark.extra_info.update(values)

    return _record


@pytest.fixture()
def sync():
    """:func:`synced` as a fixture (benchmark files do not import this conftest)."""
    return synced


@pytest.fixture()
def device_time():
    """:func:`device_seconds` as a fixture; on a machine without CUDA it returns None."""
    if not torch.cuda.is_available():
        return lambda fn, *args, **kwargs: None
    return device_seconds


@pytest.fixture()
def copy_gbps():
    """:func:`copy_bandwidth_gbps` as a fixture (NaN without a GPU)."""
    return copy_bandwidth_gbps()
