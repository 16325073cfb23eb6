"""mask_search_topk (r = 4): C++ CPU kernel vs the PyTorch reference vs faiss-cpu's IndexBinaryFlat
k-NN; on GPU the CUDA kernel vs the PyTorch reference.

    python -m pytest benchmarks/bench_mask_search_topk.py --benchmark-only --benchmark-json out.json

Masks of D = 1536 and D = 14336 bits (LLaMA-3-8B's D) with about 2/7 of the bits active (k = 439 and
4096); banks of 10k and 100k masks; batch 1 (and 64 for the kernels). GB/s counts the bank bytes
read once per call; on GPU it comes from the device time (``device_s``, L2 flushed before each
call: see benchmarks/conftest.py).
"""

import numpy as np
import pytest
import torch

from memoir_kernels import mask_search_topk_reference, pack_bits
from memoir_kernels._native import native_available, native_has_cuda

R = 4
ACTIVE = {1536: 439, 14336: 4096}
BANKS = [10000, 100000]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _masks(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 2000):
        scores = torch.rand(min(2000, n - start), dim, generator=generator)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(ACTIVE[dim], dim=1).indices, True)
        out.append(pack_bits(mask))
    return torch.cat(out)


_cache: dict = {}


def _data(n: int, dim: int, batch: int, device: str = "cpu"):
    if (n, dim) not in _cache:
        _cache[(n, dim)] = _masks(n, dim, seed=n + dim)
    return _masks(batch, dim, seed=7).to(device), _cache[(n, dim)].to(device)


def _bandwidth(bank: torch.Tensor, seconds: float) -> float:
    return bank.numel() * 8 / seconds / 1e9


def _group(where: str, n: int, dim: int, batch: int) -> str:
    return f"mask_search_topk {where} r={R} D={dim} N={n} B={batch}"


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("dim", [1536, 14336])
@pytest.mark.parametrize("n", BANKS)
@pytest.mark.skipif(not native_available(torch.device("cpu")), reason="C++ kernel not built")
def test_cpu_kernel(benchmark, record, n, dim, batch):
    query, bank = _data(n, dim, batch)
    benchmark.group = _group("cpu", n, dim, batch)
    benchmark(torch.ops.memoir.mask_search_topk_native, query, bank, R)
    record(bank=n, dim=dim, batch=batch, r=R, impl="memoir C++", popcount=torch.ops.memoir.cpu_popcount(),
           gb_per_s=_bandwidth(bank, benchmark.stats.stats.median))


@pytest.mark.parametrize("batch", [1])
@pytest.mark.parametrize("dim", [1536, 14336])
@pytest.mark.parametrize("n", BANKS)
def test_torch_reference(benchmark, record, n, dim, batch):
    query, bank = _data(n, dim, batch)
    benchmark.group = _group("cpu", n, dim, batch)
    benchmark.pedantic(mask_search_topk_reference, args=(query, bank, R), rounds=3, iterations=1)
    record(bank=n, dim=dim, batch=batch, r=R, impl="torch reference",
           gb_per_s=_bandwidth(bank, benchmark.stats.stats.median))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("dim", [1536, 14336])
@pytest.mark.parametrize("n", BANKS)
def test_faiss_binary_flat(benchmark, record, n, dim, batch):
    faiss = pytest.importorskip("faiss")
    query, bank = _data(n, dim, batch)
    index = faiss.IndexBinaryFlat(dim)
    index.add(bank.numpy().view(np.uint8))
    codes = query.numpy().view(np.uint8)
    benchmark.group = _group("cpu", n, dim, batch)
    benchmark(index.search, codes, R)
    record(bank=n, dim=dim, batch=batch, r=R, impl="faiss IndexBinaryFlat",
           gb_per_s=_bandwidth(bank, benchmark.stats.stats.median))


@needs_cuda
@pytest.mark.skipif(not native_has_cuda(), reason="CUDA kernel not built")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("dim", [1536, 14336])
@pytest.mark.parametrize("n", BANKS)
def test_gpu_kernel(benchmark, record, sync, device_time, copy_gbps, n, dim, batch):
    query, bank = _data(n, dim, batch, "cuda")
    benchmark.group = _group("gpu", n, dim, batch)
    benchmark(sync(torch.ops.memoir.mask_search_topk_native), query, bank, R)
    device_s = device_time(torch.ops.memoir.mask_search_topk_native, query, bank, R)
    gbps = _bandwidth(bank, device_s)
    record(bank=n, dim=dim, batch=batch, r=R, impl="memoir CUDA", device_s=device_s, gb_per_s=gbps,
           pct_of_copy=100 * gbps / copy_gbps)


@needs_cuda
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("dim", [1536, 14336])
@pytest.mark.parametrize("n", BANKS)
def test_gpu_reference(benchmark, record, sync, device_time, copy_gbps, n, dim, batch):
    query, bank = _data(n, dim, batch, "cuda")
    benchmark.group = _group("gpu", n, dim, batch)
    benchmark(sync(mask_search_topk_reference), query, bank, R)
    device_s = device_time(mask_search_topk_reference, query, bank, R)
    gbps = _bandwidth(bank, device_s)
    record(bank=n, dim=dim, batch=batch, r=R, impl="torch reference", device_s=device_s, gb_per_s=gbps,
           pct_of_copy=100 * gbps / copy_gbps)
