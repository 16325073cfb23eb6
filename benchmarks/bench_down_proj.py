"""memoir_down_proj at LLaMA-3-8B's shape (d 4096, D 14336, k 4096): the edited layer vs the plain
down projection alone and vs the PyTorch reference, at 1, 16 and 2048 tokens.

    python -m pytest benchmarks/bench_down_proj.py --benchmark-only

On GPU: bf16 activations and W0, W_m in bf16 (``memory_dtype="bfloat16"``: half the bytes of the
fp32 default, which matters at 1 token where the layer is bandwidth-bound). The Triton cases run with
the base output given (the edited layer's path) and with the base product fused in. On CPU (fp32,
reference only) 2048 tokens is skipped. GB/s counts W0 plus the W_m rows the gated tokens need; on
GPU it comes from the device time (``device_s``, see benchmarks/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

from memoir_kernels import backend, memoir_down_proj, memoir_down_proj_reference, pack_bits

HIDDEN, DIM, K = 4096, 14336, 4096
CUDA = torch.cuda.is_available()
TOKENS = [pytest.param(t, id=f"T{t}", marks=[] if CUDA or t <= 16 else pytest.mark.skip("CPU: too slow"))
          for t in (1, 16, 2048)]
_cache: dict = {}


def _inputs(tokens):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    if "weights" not in _cache:
        weight = (torch.randn(HIDDEN, DIM, device=device) / DIM**0.5).to(dtype)
        memory = (torch.randn(DIM, HIDDEN, device=device) / DIM**0.5).to(dtype)
        scores = torch.rand(1, DIM, device=device)
        mask = torch.zeros(1, DIM, dtype=torch.bool, device=device).scatter_(1, scores.topk(K, dim=1).indices, True)
        _cache["weights"] = weight, memory, pack_bits(mask)
    weight, memory, bits = _cache["weights"]
    a = torch.randn(tokens, DIM, device=device).to(dtype)
    rows = torch.zeros(tokens, dtype=torch.int64, device=device)
    gate = torch.ones(1, dtype=torch.bool, device=device)
    return a, weight, memory, rows, bits, gate


def _gbps(weight, memory, seconds):
    return (weight.numel() * weight.element_size() + K * HIDDEN * memory.element_size()) / seconds / 1e9


@pytest.mark.parametrize("tokens", TOKENS)
def test_plain_down_proj(benchmark, record, sync, device_time, tokens):
    a, weight, memory, *_ = _inputs(tokens)
    benchmark.group = f"down_proj T={tokens}"
    benchmark(sync(F.linear), a, weight)
    device_s = device_time(F.linear, a, weight)
    record(impl="plain F.linear", tokens=tokens, device_s=device_s, gb_per_s=weight.numel() * weight.element_size()
           / (device_s or benchmark.stats.stats.median) / 1e9)


@pytest.mark.parametrize("tokens", TOKENS)
def test_torch_reference(benchmark, record, sync, device_time, tokens):
    a, weight, memory, rows, bits, gate = _inputs(tokens)
    benchmark.group = f"down_proj T={tokens}"
    benchmark.pedantic(sync(memoir_down_proj_reference), args=(a, weight, memory, rows, bits, gate),
                       rounds=5 if not CUDA else 30, warmup_rounds=1)
    device_s = device_time(memoir_down_proj_reference, a, weight, memory, rows, bits, gate)
    record(impl="torch reference", tokens=tokens, device_s=device_s,
           gb_per_s=_gbps(weight, memory, device_s or benchmark.stats.stats.median))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter is not a benchmark)")
@pytest.mark.parametrize("given_base", [True, False], ids=["base-given", "base-fused"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_triton_kernel(benchmark, record, sync, device_time, monkeypatch, tokens, given_base):
    monkeypatch.setattr(backend, "_requested", "triton")  # restored after the test
    a, weight, memory, rows, bits, gate = _inputs(tokens)

    def edited():
        # base-given is the edited layer's path: the original module's product, then the kernel.
        if given_base:
            return memoir_down_proj(a, None, memory, rows, bits, gate, base=F.linear(a, weight))
        return memoir_down_proj(a, weight, memory, rows, bits, gate)

    benchmark.group = f"down_proj T={tokens}"
    benchmark(sync(edited))
    device_s = device_time(edited)
    record(impl=f"triton ({'base given' if given_base else 'base fused'})", tokens=tokens, device_s=device_s,
           gb_per_s=_gbps(weight, memory, device_s))
