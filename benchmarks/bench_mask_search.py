"""mask_search: C++ CPU kernel vs faiss-cpu IndexBinaryFlat vs the PyTorch reference; on GPU the CUDA
kernel vs the PyTorch reference and as % of the device's measured copy bandwidth.

    python -m pytest benchmarks/bench_mask_search.py --benchmark-only --benchmark-json out.json

Masks of 14336 bits (LLaMA-3-8B's D) with k = 4096 active; banks of 1k and 10k (100k with
MEMOIR_BENCH_LARGE=1); batch 1 and 64. GB/s counts the bank bytes read once per call; on GPU it
comes from the device time (``device_s``, L2 flushed before each call: see benchmarks/conftest.py).
"""

import os

import numpy as np
import pytest
import torch

from memoir_kernels import mask_search_reference, pack_bits
from memoir_kernels._native import native_available, native_has_cuda

DIM, K = 14336, 4096
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BANKS = [1000, 10000] + ([100000] if os.environ.get("MEMOIR_BENCH_LARGE") else [])


def _masks(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 2000):
        scores = torch.rand(min(2000, n - start), DIM, generator=generator)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(K, dim=1).indices, True)
        out.append(pack_bits(mask))
    return torch.cat(out)


_cache: dict = {}


def _data(n: int, batch: int, device: str = "cpu"):
    if n not in _cache:
        _cache[n] = _masks(n, seed=n)
    return _masks(batch, seed=7).to(device), _cache[n].to(device)


def _bandwidth(bank: torch.Tensor, seconds: float) -> float:
    return bank.numel() * 8 / seconds / 1e9


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("n", BANKS)
@pytest.mark.skipif(not native_available(torch.device("cpu")), reason="C++ kernel not built")
def test_cpu_kernel(benchmark, record, n, batch):
    query, bank = _data(n, batch)
    benchmark.group = f"mask_search cpu N={n} B={batch}"
    benchmark(torch.ops.memoir.mask_search_native, query, bank)
    record(bank=n, batch=batch, impl="memoir C++", popcount=torch.ops.memoir.cpu_popcount(),
           gb_per_s=_bandwidth(bank, benchmark.stats.stats.median))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("n", BANKS)
def test_faiss_binary_flat(benchmark, record, n, batch):
    faiss = pytest.importorskip("faiss")
    query, bank = _data(n, batch)
    index = faiss.IndexBinaryFlat(DIM)
    index.add(bank.numpy().view(np.uint8))
    codes = query.numpy().view(np.uint8)
    benchmark.group = f"mask_search cpu N={n} B={batch}"
    benchmark(index.search, codes, 1)
    record(bank=n, batch=batch, impl="faiss IndexBinaryFlat", gb_per_s=_bandwidth(bank, benchmark.stats.stats.median))


@pytest.mark.parametrize("batch", [1])
@pytest.mark.parametrize("n", BANKS)
def test_torch_reference(benchmark, record, n, batch):
    query, bank = _data(n, batch)
    benchmark.group = f"mask_search cpu N={n} B={batch}"
    benchmark.pedantic(mask_search_reference, args=(query, bank), rounds=3, iterations=1)
    record(bank=n, batch=batch, impl="torch reference", gb_per_s=_bandwidth(bank, benchmark.stats.stats.median))


@needs_cuda
@pytest.mark.skipif(not native_has_cuda(), reason="CUDA kernel not built")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("n", BANKS + [100000])
def test_gpu_kernel(benchmark, record, sync, device_time, copy_gbps, n, batch):
    query, bank = _data(n, batch, "cuda")
    benchmark.group = f"mask_search gpu N={n} B={batch}"
    benchmark(sync(torch.ops.memoir.mask_search_native), query, bank)
    device_s = device_time(torch.ops.memoir.mask_search_native, query, bank)
    gbps = _bandwidth(bank, device_s)
    record(bank=n, batch=batch, impl="memoir CUDA", device_s=device_s, gb_per_s=gbps, pct_of_copy=100 * gbps / copy_gbps)


@needs_cuda
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("n", BANKS + [100000])
def test_gpu_reference(benchmark, record, sync, device_time, copy_gbps, n, batch):
    query, bank = _data(n, batch, "cuda")
    benchmark.group = f"mask_search gpu N={n} B={batch}"
    benchmark(sync(mask_search_reference), query, bank)
    device_s = device_time(mask_search_reference, query, bank)
    gbps = _bandwidth(bank, device_s)
    record(bank=n, batch=batch, impl="torch reference", device_s=device_s, gb_per_s=gbps,
           pct_of_copy=100 * gbps / copy_gbps)
