import pytest
import torch

from memoir_kernels import masked_residual, tophash_from_keys, tophash_residual, tophash_residual_reference, unpack_bits

from .helpers import kernel_device as _device


def test_reference_equals_the_separate_ops():
    key, perm = torch.randn(100), torch.randperm(100)
    acts, memory = torch.randn(7, 100), torch.randn(100, 9)
    mask = unpack_bits(tophash_from_keys(key[None], perm, 30), 100).expand(7, -1)
    assert torch.equal(tophash_residual_reference(key, perm, 30, acts, memory), masked_residual(acts, memory, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens,dim,hidden,k", [
    pytest.param(1, 70, 33, 20, id="1x70"), pytest.param(11, 130, 24, 40, id="11x130"),
    pytest.param(20, 300, 17, 300, id="k=D"),
])
def test_triton_matches_separate_ops(triton_backend, dtype, tokens, dim, hidden, k):
    """Quarter-step keys: many ties, so the fused selection must follow the tie rule exactly
    (a wrong column would change the product by far more than the error budget)."""
    device = _device()
    key = (torch.randint(-8, 8, (dim,)) / 4).to(device)
    perm = torch.randperm(dim).to(device)
    acts, memory = torch.randn(tokens, dim, device=device), torch.randn(dim, hidden, device=device)
    exact = tophash_residual_reference(key, perm, k, acts, memory)
    got = tophash_residual(key, perm, k, acts.to(dtype), memory)
    ref = tophash_residual_reference(key, perm, k, acts.to(dtype), memory)
    assert got.dtype == dtype
    assert (got.float() - exact).abs().max() <= 2 * (ref.float() - exact).abs().max() + 1e-4


def test_triton_backward_equals_reference(triton_backend):
    device = _device()
    key, perm = torch.randn(70, device=device), torch.randperm(70, device=device)
    acts = torch.randn(5, 70, device=device, requires_grad=True)
    memory = torch.randn(70, 9, device=device, requires_grad=True)
    grads = []
    for fn in (tophash_residual, tophash_residual_reference):
        fn(key, perm, 20, acts, memory).square().sum().backward()
        grads.append((acts.grad.clone(), memory.grad.clone()))
        acts.grad, memory.grad = None, None
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
