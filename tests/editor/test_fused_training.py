"""The editing forward runs the fused TopHash + residual kernel where the Triton backend runs (GPUs;
here the interpreter), with the stored mask exactly the kernel's selection; CPU keeps PyTorch."""

import contextlib
import importlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memoir
from memoir.models import tiny_model
from memoir_kernels import set_backend, tophash_residual, tophash_residual_reference

from ..kernels.helpers import kernel_device
from .helpers import EDITS, UNRELATED, tiny_config

FUSED_OP = "memoir.tophash_residual.default"


class _OpCounter(TorchDispatchMode):
    """Counts every op the dispatcher runs (each registered op's call counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fused_launches(monkeypatch):
    """Counts launches of the fused Triton kernel (each goes through ``wrap_triton`` once)."""
    module = importlib.import_module("memoir_kernels.tophash_residual")  # the package exports a function of that name

    launches = Counter()
    original = module.wrap_triton

    def counting(kernel):
        launches[kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__] += 1
        return original(kernel)

    monkeypatch.setattr(module, "wrap_triton", counting)
    return launches


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


def _edit(char_tokenizer, backend: str, monkeypatch, rehearse: int = 0, counter=None):
    set_backend(backend)
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(char_tokenizer)).to(kernel_device())
    editor = memoir.attach(model, char_tokenizer, tiny_config(n_iter=3, rehearse=rehearse))
    editor.fit_background(UNRELATED)
    results = [editor.edit(*EDITS[0])]
    with counter if counter is not None else contextlib.nullcontext():
        results.append(editor.edit(*EDITS[1]))
    return editor, results


@pytest.mark.parametrize("rehearse", [0, 1], ids=["alone", "with a rehearsed row"])
def test_each_training_forward_launches_the_fused_kernel_once(char_tokenizer, triton_backend, monkeypatch,
                                                              fused_launches, rehearse):
    counter = _OpCounter()
    _, results = _edit(char_tokenizer, "triton", monkeypatch, rehearse, counter)
    forwards = sum(len(r.losses) for r in results)
    assert results[-1].rehearsed == rehearse
    # The fast path: one residual per step, through the registered op, launching the fused kernel.
    assert counter.calls[FUSED_OP] == len(results[-1].losses)
    assert fused_launches["_tophash_residual_kernel"] == forwards


def test_the_fused_path_trains_what_the_pytorch_path_trains(char_tokenizer, triton_backend, monkeypatch):
    fused, fused_results = _edit(char_tokenizer, "triton", monkeypatch, rehearse=1)
    plain, plain_results = _edit(char_tokenizer, "torch", monkeypatch, rehearse=1)
    # The same masks are stored (the kernel's selection is the stored mask), and the same training
    # up to the fp32 rounding of a differently ordered product.
    assert torch.equal(fused.layer.bank_bits.cpu(), plain.layer.bank_bits.cpu())
    for got, want in zip(fused_results, plain_results, strict=True):
        torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.layer.memory.cpu(), plain.layer.memory.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cpu_editing_stays_on_pytorch(char_tokenizer, monkeypatch, fused_launches):
    counter = _OpCounter()
    _edit(char_tokenizer, "auto", monkeypatch, counter=counter)
    assert counter.calls[FUSED_OP] == 0 and not fused_launches


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_fused_backward_equals_autograd_through_the_reference(triton_backend, dtype, tolerance):
    device = kernel_device()
    generator = torch.Generator().manual_seed(3)
    key = torch.randn(90, generator=generator).to(device)
    perm = torch.randperm(90, generator=generator).to(device)
    acts = torch.randn(13, 90, generator=generator, dtype=dtype).to(device).requires_grad_(True)
    memory = torch.randn(90, 11, generator=generator, dtype=dtype).to(device).requires_grad_(True)
    upstream = torch.randn(13, 11, generator=generator, dtype=dtype).to(device)
    grads = []
    for fn in (tophash_residual, tophash_residual_reference):
        torch.autograd.backward(fn(key, perm, 25, acts, memory), upstream)
        grads.append((acts.grad.clone(), memory.grad.clone()))
        acts.grad = memory.grad = None
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
