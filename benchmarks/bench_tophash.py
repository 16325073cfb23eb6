"""tophash: the Triton kernel (GPU) vs the PyTorch chain (window mean, decentring, stable sort,
permutation, packing), at LLaMA-3-8B's D = 14336 with k = 4096.

    python -m pytest benchmarks/bench_tophash.py --benchmark-only

Cases: batch 1 (one prompt of 16 tokens: the routing step) and 4096 rows (4096 one-token keys, as
when a batch of keys is hashed at once). GB/s counts the activations read once; on GPU it comes
from the device time (``device_s``, see benchmarks/conftest.py).
"""

import pytest
import torch

from memoir_kernels import backend, inverse_permutation, tophash, tophash_reference

DIM, K = 14336, 4096
# 4096 rows on GPU; 256 on CPU, where the reference's sort of 4096 rows takes about a minute.
ROWS = 4096 if torch.cuda.is_available() else 256
CASES = [pytest.param(1, 16, id="B1xT16"), pytest.param(ROWS, 1, id=f"B{ROWS}xT1")]


def _inputs(batch, tokens, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    acts = torch.randn(batch, tokens, DIM, device=device).to(dtype)
    window = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    mu = torch.randn(DIM, device=device)
    perm = torch.randperm(DIM).to(device)
    return acts, window, mu, perm


def _gbps(acts, seconds):
    return acts.numel() * acts.element_size() / seconds / 1e9


@pytest.mark.parametrize("batch,tokens", CASES)
def test_torch_chain(benchmark, record, sync, device_time, batch, tokens):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    acts, window, mu, perm = _inputs(batch, tokens, device)
    benchmark.group = f"tophash B={batch} T={tokens}"
    benchmark.pedantic(sync(tophash_reference), args=(acts, window, mu, perm, K), rounds=5 if device == "cpu" else 50,
                       warmup_rounds=1)
    device_s = device_time(tophash_reference, acts, window, mu, perm, K)
    record(impl="torch chain", batch=batch, tokens=tokens, device_s=device_s,
           gb_per_s=_gbps(acts, device_s or benchmark.stats.stats.median))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter is not a benchmark)")
@pytest.mark.parametrize("batch,tokens", CASES)
def test_triton_kernel(benchmark, record, sync, device_time, monkeypatch, batch, tokens):
    monkeypatch.setattr(backend, "_requested", "triton")  # restored after the test
    acts, window, mu, perm = _inputs(batch, tokens, "cuda")
    inverse = inverse_permutation(perm)
    benchmark.group = f"tophash B={batch} T={tokens}"
    benchmark(sync(tophash), acts, window, mu, perm, K, inverse_perm=inverse)
    device_s = device_time(tophash, acts, window, mu, perm, K, inverse_perm=inverse)
    record(impl="triton", batch=batch, tokens=tokens, device_s=device_s, gb_per_s=_gbps(acts, device_s))
