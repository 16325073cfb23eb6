import pytest
import torch

from memoir_kernels import pack_bits, prompt_keys, tophash, tophash_from_keys, tophash_reference, unpack_bits

from .helpers import kernel_device as _device


def _expected_mask(keys, perm, k):
    """Independent oracle: rank by (-|key|, index) with Python's sort, then permute."""
    rows = []
    for key in keys.tolist():
        order = sorted(range(len(key)), key=lambda i: (-abs(key[i]), i))[:k]
        row = torch.zeros(len(key), dtype=torch.bool)
        row[perm[order]] = True
        rows.append(row)
    return torch.stack(rows)


def test_ties_go_to_the_lower_index():
    keys = torch.tensor([[1.0, -3.0, 3.0, 2.0, -2.0, 0.5]])
    perm = torch.arange(6)
    mask = unpack_bits(tophash_from_keys(keys, perm, 3), 6)[0]
    # |key| = 1 3 3 2 2 .5 -> top-3 = {1, 2} then the tie 2 vs 2 goes to index 3.
    assert mask.tolist() == [False, True, True, True, False, False]


def test_mask_selects_permuted_positions():
    keys = torch.tensor([[0.0, 5.0, 0.0, 4.0]])
    perm = torch.tensor([2, 0, 3, 1])
    mask = unpack_bits(tophash_from_keys(keys, perm, 2), 4)[0]
    assert mask.nonzero().flatten().tolist() == sorted([perm[1].item(), perm[3].item()])


@pytest.mark.parametrize("dim,k", [pytest.param(70, 20, id="D70"), pytest.param(128, 37, id="D128"),
                                   pytest.param(1, 1, id="D1")])
def test_matches_independent_oracle(dim, k):
    keys = torch.randn(4, dim).round(decimals=1)  # rounding creates many ties
    perm = torch.randperm(dim)
    got = unpack_bits(tophash_from_keys(keys, perm, k), dim)
    assert torch.equal(got, _expected_mask(keys, perm, k))
    assert (got.sum(dim=1) == k).all()


def test_prompt_keys_excludes_padding_and_subtracts_mu():
    acts = torch.randn(2, 5, 8)
    window = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    mu = torch.randn(8)
    keys = prompt_keys(acts, window, mu)
    torch.testing.assert_close(keys[0], acts[0, :3].mean(0) - mu)
    torch.testing.assert_close(keys[1], acts[1, 1:].mean(0) - mu)


def test_empty_window_gives_finite_key():
    keys = prompt_keys(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool), torch.ones(4))
    assert torch.isfinite(keys).all() and torch.equal(keys, -torch.ones(1, 4))


def test_no_window_is_every_token():
    """window=None (the edited layer called without a prompt window) is an all-true window, to the bit."""
    acts, mu, perm = torch.randn(3, 6, 90), torch.randn(90), torch.randperm(90)
    full = torch.ones(3, 6, dtype=torch.bool)
    assert torch.equal(prompt_keys(acts, None, mu), prompt_keys(acts, full, mu))
    assert torch.equal(tophash(acts, None, mu, perm, 30), tophash_reference(acts, full, mu, perm, 30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_tophash_equals_reference_chain(dtype):
    acts = torch.randn(3, 6, 100).to(dtype)
    window = torch.rand(3, 6) < 0.7
    window[:, 0] = True
    mu, perm = torch.randn(100), torch.randperm(100)
    expected = pack_bits(_expected_mask(prompt_keys(acts, window, mu), perm, 29))
    assert torch.equal(tophash(acts, window, mu, perm, 29), expected)
    assert torch.equal(tophash_reference(acts, window, mu, perm, 29), expected)


def test_bad_k_raises():
    with pytest.raises(ValueError, match="top_k"):
        tophash_from_keys(torch.randn(1, 4), torch.arange(4), 5)


# ------------------------------------------------------------------------ Triton kernel (interpreter on CPU)


def _exact_inputs(batch, tokens, dim, dtype, device):
    """Quarter-step activations: every window sum is exact in fp32 whatever the summation order, so
    the kernel's keys equal the reference's bit for bit and the masks must match exactly. The coarse
    grid also makes ties in |key| frequent, which exercises the tie rule."""
    acts = (torch.randint(-8, 8, (batch, tokens, dim)) / 4).to(dtype).to(device)
    window = torch.rand(batch, tokens) < 0.7
    window[:, 0] = True
    mu = (torch.randint(-4, 4, (dim,)) / 8).to(device)
    return acts, window.to(device), mu, torch.randperm(dim).to(device)


TRITON_SHAPES = [
    pytest.param(1, 1, 1, 1, id="1x1x1"), pytest.param(3, 6, 100, 29, id="3x6x100"),
    pytest.param(2, 3, 70, 70, id="k=D"), pytest.param(2, 2, 130, 64, id="D130"),
    pytest.param(1, 4, 1536, 439, id="smollm2"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,tokens,dim,k", TRITON_SHAPES)
def test_triton_tophash_equals_reference(triton_backend, dtype, batch, tokens, dim, k):
    acts, window, mu, perm = _exact_inputs(batch, tokens, dim, dtype, _device())
    got = tophash(acts, window, mu, perm, k)
    assert torch.equal(got, tophash_reference(acts, window, mu, perm, k))
    assert torch.equal(unpack_bits(got, dim).sum(dim=1), torch.full((batch,), k, device=got.device))


def test_triton_tophash_without_mu_empty_window_and_given_inverse(triton_backend):
    from memoir_kernels import inverse_permutation

    acts, window, _, perm = _exact_inputs(3, 5, 200, torch.float32, _device())
    window[1] = False  # an empty window: zero key, so the tie rule alone picks the mask
    got = tophash(acts, window, None, perm, 50, inverse_perm=inverse_permutation(perm))
    assert torch.equal(got, tophash_reference(acts, window, None, perm, 50))


def test_triton_tophash_without_window(triton_backend):
    """No window: the kernel weighs every token 1, the same arithmetic as an all-true window."""
    acts, _, mu, perm = _exact_inputs(2, 5, 130, torch.float32, _device())
    full = torch.ones(2, 5, dtype=torch.bool, device=acts.device)
    got = tophash(acts, None, mu, perm, 40)
    assert torch.equal(got, tophash(acts, full, mu, perm, 40))
    assert torch.equal(got, tophash_reference(acts, None, mu, perm, 40))


def test_triton_tophash_random_floats_keep_k_bits(triton_backend):
    acts = torch.randn(2, 7, 300, device=_device())
    window = torch.ones(2, 7, dtype=torch.bool, device=_device())
    perm = torch.randperm(300, device=_device())
    got = tophash(acts, window, None, perm, 77)
    ref = tophash_reference(acts, window, None, perm, 77)
    overlap = (unpack_bits(got, 300) & unpack_bits(ref, 300)).sum(dim=1)
    assert (unpack_bits(got, 300).sum(dim=1) == 77).all() and (overlap >= 75).all()


def test_triton_tophash_op_passes_opcheck(triton_backend):
    from memoir_kernels import inverse_permutation

    acts, window, mu, perm = _exact_inputs(2, 3, 70, torch.float32, _device())
    # The AOT-dispatch check runs the kernel on wrapper tensors, which the interpreter cannot read.
    utils = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration", "test_faketensor")
    for given in (window, None):
        torch.library.opcheck(torch.ops.memoir.tophash_triton.default, (acts, given, mu, inverse_permutation(perm), 20),
                              test_utils=utils)


@pytest.mark.parametrize("k", [1, 150, 299, 300])
def test_triton_tophash_keys_differing_only_in_low_bits(triton_backend, k):
    """Keys that share every high bit (1 + j ulp, with repeats) make the k-th largest |key| depend on
    the lowest byte of its bit pattern: the selection must still equal the reference exactly."""
    dim = 300
    ulps = torch.randint(0, 200, (1, 1, dim))  # repeats: ties at the threshold
    acts = (1.0 + ulps.double() * 2.0**-23).float() * torch.where(torch.rand(1, 1, dim) < 0.5, -1.0, 1.0)
    acts, perm = acts.to(_device()), torch.randperm(dim).to(_device())
    got = tophash(acts, None, None, perm, k)
    assert torch.equal(got, tophash_reference(acts, None, None, perm, k))
