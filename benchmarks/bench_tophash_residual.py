"""The fused editing-forward op vs the separate ops it replaces (TopHash of the key, unpack, masked
residual product): 11 training rows of 20 tokens at LLaMA-3-8B's shape (D 14336, d 4096, k 4096) on
GPU, at SmolLM2's (D 1536, d 576, k 439) on CPU.

    python -m pytest benchmarks/bench_tophash_residual.py --benchmark-only
"""

import pytest
import torch

from memoir_kernels import backend, masked_residual, tophash_from_keys, tophash_residual, unpack_bits

CUDA = torch.cuda.is_available()
# LLaMA-3-8B's shape on GPU; SmolLM2's on CPU (the 8B shape is 13 GFLOP of fp32 matmul per call).
HIDDEN, DIM, K, TOKENS = (4096, 14336, 4096, 220) if CUDA else (576, 1536, 439, 220)


def _inputs():
    device = "cuda" if CUDA else "cpu"
    key = torch.randn(DIM, device=device)
    perm = torch.randperm(DIM).to(device)
    acts = torch.randn(TOKENS, DIM, device=device).to(torch.bfloat16 if CUDA else torch.float32)
    memory = torch.zeros(DIM, HIDDEN, device=device)
    return key, perm, acts, memory


def _separate(key, perm, acts, memory):
    mask = unpack_bits(tophash_from_keys(key[None], perm, K), DIM)
    return masked_residual(acts, memory, mask.expand(acts.shape[0], -1))


def test_separate_ops(benchmark, record, sync, device_time):
    key, perm, acts, memory = _inputs()
    benchmark.group = "tophash_residual"
    benchmark.pedantic(sync(_separate), args=(key, perm, acts, memory), rounds=5 if not CUDA else 30, warmup_rounds=1)
    record(impl="separate ops (torch)", tokens=TOKENS, device_s=device_time(_separate, key, perm, acts, memory))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter is not a benchmark)")
def test_fused_triton(benchmark, record, sync, device_time, monkeypatch):
    monkeypatch.setattr(backend, "_requested", "triton")  # restored after the test
    key, perm, acts, memory = _inputs()
    benchmark.group = "tophash_residual"
    benchmark(sync(tophash_residual), key, perm, K, acts, memory)
    record(impl="fused triton", tokens=TOKENS, device_s=device_time(tophash_residual, key, perm, K, acts, memory))
