import pytest
import torch

from memoir_kernels import pack_bits, prompt_keys, tophash, tophash_from_keys, tophash_reference, unpack_bits


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
