import pytest
import torch

from memoir_kernels import tophash_residual, tophash_residual_reference

from .helpers import kernel_device as _device


def _naive_tophash_residual(key, perm, k, acts, memory):
    """Float64 oracle from the documented contract alone (memoir_kernels/tophash.py): rank the key's
    indices by |key|, larger first and the lower index first among equal values; keep k; kept index
    i switches on mask position perm[i]; then out[t] = sum over those positions j of
    acts[t, j] * memory[j, :], one token and one position at a time."""
    magnitude = [abs(float(v)) for v in key.reshape(-1).tolist()]
    ranked = sorted(range(len(magnitude)), key=lambda i: (-magnitude[i], i))
    order = perm.tolist()
    positions = sorted(order[i] for i in ranked[:k])
    acts64, memory64 = acts.double().cpu(), memory.double().cpu()
    out = torch.zeros(acts.shape[0], memory.shape[1], dtype=torch.float64)
    for t in range(acts.shape[0]):
        for j in positions:
            out[t] += acts64[t, j] * memory64[j]
    return out


@pytest.mark.parametrize("impl", ["reference", "dispatch", "triton"])
@pytest.mark.parametrize("dim,k", [
    pytest.param(70, 1, id="70-k1"), pytest.param(70, 20, id="70-k20"), pytest.param(130, 64, id="130-k64"),
    pytest.param(50, 50, id="k=D"),
])
def test_matches_naive_oracle(request, impl, dim, k):
    """Quarter-step keys tie often, so the oracle's tie rule decides columns near the cut; a wrong
    column, a wrong tie winner or the permutation applied the other way round moves the output by
    O(1), far past fp32's rounding of these short sums."""
    if impl == "triton":
        request.getfixturevalue("triton_backend")
    function = tophash_residual_reference if impl == "reference" else tophash_residual
    device = _device() if impl == "triton" else "cpu"
    key = torch.randint(-8, 8, (dim,)) / 4
    perm = torch.randperm(dim)
    acts, memory = torch.randn(6, dim), torch.randn(dim, 11)
    got = function(key.to(device), perm.to(device), k, acts.to(device), memory.to(device))
    assert got.dtype == torch.float32 and got.shape == (6, 11)
    torch.testing.assert_close(got.double().cpu(), _naive_tophash_residual(key, perm, k, acts, memory),
                               rtol=1e-5, atol=1e-4)


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
