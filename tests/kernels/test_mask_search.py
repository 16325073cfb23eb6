import numpy as np
import pytest
import torch

from memoir_kernels import mask_search, mask_search_reference, pack_bits
from memoir_kernels._native import native_available


def _random_masks(n, dim, k):
    scores = torch.rand(n, dim)
    mask = torch.zeros(n, dim, dtype=torch.bool)
    mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return pack_bits(mask)


def _oracle(query, bank, dim):
    """Python loop over unpacked masks: max overlap, lowest index on ties."""
    out = []
    for q in query:
        best, best_i = -1, -1
        for i, m in enumerate(bank):
            value = sum(bin((int(a) & int(b)) & 0xFFFFFFFFFFFFFFFF).count("1") for a, b in zip(q, m, strict=True))
            if value > best:
                best, best_i = value, i
        out.append((best_i, max(best, 0)))
    return out


IMPLEMENTATIONS = [pytest.param(mask_search_reference, id="reference"), pytest.param(mask_search, id="dispatch")]


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
@pytest.mark.parametrize("n,dim,k,batch", [
    pytest.param(1, 64, 10, 1, id="1x64"), pytest.param(37, 70, 20, 3, id="37x70"),
    pytest.param(200, 130, 7, 9, id="200x130-ties"), pytest.param(5000, 200, 57, 2, id="5000x200-chunks"),
])
def test_matches_oracle(search, n, dim, k, batch):
    bank, query = _random_masks(n, dim, k), _random_masks(batch, dim, k)
    index, overlap = search(query, bank)
    assert index.dtype == torch.int64 and overlap.dtype == torch.int32
    expected = _oracle(query.tolist(), bank.tolist(), dim) if n <= 200 else None
    if expected is not None:
        assert list(zip(index.tolist(), overlap.tolist(), strict=True)) == expected
    ref_index, ref_overlap = mask_search_reference(query, bank)
    assert torch.equal(index, ref_index) and torch.equal(overlap, ref_overlap)


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
def test_empty_bank(search):
    index, overlap = search(_random_masks(3, 100, 10), torch.zeros(0, 2, dtype=torch.int64))
    assert index.tolist() == [-1, -1, -1] and overlap.tolist() == [0, 0, 0]


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
def test_ties_go_to_lowest_index(search):
    bank = _random_masks(4, 128, 16)
    bank = torch.cat([bank[1:2], bank, bank[1:2]])  # rows 0, 2 and 5 are the same mask
    index, overlap = search(bank[2:3].clone(), bank)
    assert index.tolist() == [0] and overlap.tolist() == [16]


def test_native_cpu_kernel_is_built():
    assert native_available(torch.device("cpu")), "the C++ extension memoir_kernels._C was not built"


def test_native_equals_reference_large_bank():
    bank, query = _random_masks(3000, 1536, 439), _random_masks(16, 1536, 439)
    got = torch.ops.memoir.mask_search(query, bank)
    want = mask_search_reference(query, bank)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_native_rejects_bad_input():
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.memoir.mask_search(torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="words per mask"):
        torch.ops.memoir.mask_search(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64))


def test_equals_faiss_hamming_nearest_neighbour():
    """With k bits in every mask, |q AND m| = k - hamming(q, m) / 2: the same neighbour."""
    faiss = pytest.importorskip("faiss")
    dim, k = 1536, 439
    bank, query = _random_masks(2000, dim, k), _random_masks(8, dim, k)
    index = faiss.IndexBinaryFlat(dim)
    index.add(bank.numpy().view(np.uint8))
    distances, ids = index.search(query.numpy().view(np.uint8), 1)
    got_index, got_overlap = mask_search(query, bank)
    assert got_overlap.tolist() == [k - int(d) // 2 for d in distances[:, 0]]
    # faiss may return another id at the same distance: compare distances, then our tie rule.
    ref_index, _ = mask_search_reference(query, bank)
    assert torch.equal(got_index, ref_index)
