"""mask_search_topk: the C++ kernel, the dispatching function and the PyTorch reference against an
oracle written differently (numpy bit unpacking, a dense product and a full lexicographic sort),
against each other exactly, and against faiss-cpu's exhaustive Hamming k-NN."""

import importlib

import numpy as np
import pytest
import torch

from memoir_kernels import (
    mask_search,
    mask_search_reference,
    mask_search_topk,
    mask_search_topk_reference,
    pack_bits,
    set_backend,
    use_backend,
)
from memoir_kernels._native import native_available

# The module, not the function of the same name that memoir_kernels exports over it.
topk_module = importlib.import_module("memoir_kernels.mask_search_topk")
needs_native = pytest.mark.skipif(not native_available(torch.device("cpu")), reason="C++ kernel not built")


def _random_masks(n, dim, k):
    """``n`` packed masks over ``dim`` positions with exactly ``k`` set bits each."""
    scores = torch.rand(n, dim)
    mask = torch.zeros(n, dim, dtype=torch.bool)
    if n:
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return pack_bits(mask)


def _oracle(query, bank, r):
    """Every overlap from unpacked bits (numpy), then a full sort by (-overlap, index); pad with (-1, 0)."""
    q_bits = np.unpackbits(query.numpy().view(np.uint8), axis=1).astype(np.int64)
    m_bits = np.unpackbits(bank.numpy().view(np.uint8), axis=1).astype(np.int64)
    overlaps = q_bits @ m_bits.T  # [B, N]
    index = np.full((query.shape[0], r), -1, dtype=np.int64)
    overlap = np.zeros((query.shape[0], r), dtype=np.int32)
    rows = np.arange(bank.shape[0])
    for b in range(query.shape[0]):
        order = np.lexsort((rows, -overlaps[b]))[:r]  # last key is the primary one
        index[b, : len(order)] = order
        overlap[b, : len(order)] = overlaps[b, order]
    return torch.from_numpy(index), torch.from_numpy(overlap), overlaps


def _native(query, bank, r):
    return torch.ops.memoir.mask_search_topk_native(query, bank, r)


def _dispatch_torch(query, bank, r):
    with use_backend("torch"):
        return mask_search_topk(query, bank, r)


IMPLEMENTATIONS = [
    pytest.param(mask_search_topk_reference, id="reference"),
    pytest.param(mask_search_topk, id="dispatch-auto"),
    pytest.param(_dispatch_torch, id="dispatch-torch"),
    pytest.param(_native, id="native", marks=needs_native),
]

CASES = [
    pytest.param(1, 64, 10, 1, 1, id="1x64-r1"),
    pytest.param(1, 64, 10, 1, 4, id="1-mask-r4"),
    pytest.param(3, 70, 5, 2, 8, id="N3<r8"),
    pytest.param(37, 70, 20, 3, 5, id="37x70-r5"),
    pytest.param(200, 130, 3, 9, 16, id="200x130-k3-ties-r16"),
    pytest.param(64, 100, 4, 2, 64, id="r-equals-N"),
    pytest.param(150, 100, 2, 3, 100, id="r100-cpu-only-sizes"),
    pytest.param(5000, 200, 4, 3, 7, id="5000x200-crosses-4096-chunk"),
]


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
@pytest.mark.parametrize("n,dim,k,batch,r", CASES)
def test_matches_oracle(search, n, dim, k, batch, r):
    bank, query = _random_masks(n, dim, k), _random_masks(batch, dim, k)
    index, overlap = search(query, bank, r)
    assert index.dtype == torch.int64 and overlap.dtype == torch.int32
    assert index.shape == (batch, r) and overlap.shape == (batch, r)
    want_index, want_overlap, _ = _oracle(query, bank, r)
    assert torch.equal(overlap, want_overlap)
    assert torch.equal(index, want_index)


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", [pytest.param(3, id="B3"), pytest.param(0, id="B0")])
def test_empty_bank(search, batch):
    index, overlap = search(_random_masks(batch, 100, 10), torch.zeros(0, 2, dtype=torch.int64), 3)
    assert index.shape == (batch, 3) and overlap.shape == (batch, 3)
    assert (index == -1).all() and (overlap == 0).all()


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
def test_rows_of_zero_overlap_rank_above_empty_slots(search):
    """A disjoint row has overlap 0 but is a real row: it must be returned, not (-1, 0)."""
    query = pack_bits(torch.tensor([[True, False, False, False]]))
    bank = pack_bits(torch.tensor([[False, True, False, False], [True, False, False, False]]))
    index, overlap = search(query, bank, 3)
    assert index.tolist() == [[1, 0, -1]] and overlap.tolist() == [[1, 0, 0]]


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
def test_r1_equals_mask_search(search):
    for n, dim, k in ((1, 64, 10), (300, 130, 3), (5000, 200, 57)):
        bank, query = _random_masks(n, dim, k), _random_masks(5, dim, k)
        index, overlap = search(query, bank, 1)
        want_index, want_overlap = mask_search_reference(query, bank)
        assert torch.equal(index[:, 0], want_index) and torch.equal(overlap[:, 0], want_overlap)
        assert torch.equal(index[:, 0], mask_search(query, bank)[0])


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
def test_entry_zero_is_mask_search_for_every_r(search):
    bank, query = _random_masks(400, 130, 4), _random_masks(6, 130, 4)
    nearest, best = mask_search_reference(query, bank)
    for r in (2, 5, 33):
        index, overlap = search(query, bank, r)
        assert torch.equal(index[:, 0], nearest) and torch.equal(overlap[:, 0], best)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_reference_chunk_boundaries(monkeypatch, chunk):
    """Small reference chunks: the running top-r is merged across many chunk boundaries, with ties."""
    monkeypatch.setattr(topk_module, "_REFERENCE_CHUNK", chunk)
    bank, query = _random_masks(150, 100, 3), _random_masks(4, 100, 3)
    bank[149] = bank[2]  # an exact tie of a row in the first chunk with one in the last
    query[0] = bank[2]
    for r in (1, 6, 160):
        index, overlap = mask_search_topk_reference(query, bank, r)
        want_index, want_overlap, _ = _oracle(query, bank, r)
        assert torch.equal(index, want_index) and torch.equal(overlap, want_overlap)
        if native_available(torch.device("cpu")):
            got = torch.ops.memoir.mask_search_topk_native(query, bank, r)
            assert torch.equal(got[0], index) and torch.equal(got[1], overlap)
    assert index[0, :2].tolist() == [2, 149]


@needs_native
@pytest.mark.parametrize("r", [1, 4, 50])
def test_native_thread_slices_keep_the_tie_rule(r):
    """Sparse 1536-bit masks (overlaps mostly 0-2) split over 1-4 threads: ties cross every slice."""
    bank, query = _random_masks(6000, 1536, 12), _random_masks(3, 1536, 12)
    bank[5999] = query[1]
    bank[3001] = query[1]
    want_index, want_overlap, _ = _oracle(query, bank, r)
    original = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            index, overlap = torch.ops.memoir.mask_search_topk_native(query, bank, r)
            assert torch.equal(index, want_index) and torch.equal(overlap, want_overlap), threads
    finally:
        torch.set_num_threads(original)
    assert want_index[1, :2].tolist() == [3001, 5999][:r]


@needs_native
@pytest.mark.parametrize("batch", [pytest.param(b, id=f"B{b}") for b in (1, 7, 9, 17)])
def test_native_equals_reference_llama_width(batch):
    """14336-bit masks, batches that are not a multiple of the kernel's query group of 8."""
    bank, query = _random_masks(700, 14336, 4096), _random_masks(batch, 14336, 4096)
    bank[650] = query[0]
    got, want = torch.ops.memoir.mask_search_topk_native(query, bank, 4), mask_search_topk_reference(query, bank, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][0, 0].item() == 650 and got[1][0, 0].item() == 4096


@pytest.mark.parametrize("search", [mask_search_topk, mask_search_topk_reference])
@pytest.mark.parametrize("r", [0, -2, 2.0, True, "3", None])
def test_rejects_bad_r(search, r):
    query, bank = _random_masks(2, 100, 5), _random_masks(4, 100, 5)
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        search(query, bank, r)


@pytest.mark.parametrize("search", [mask_search_topk, mask_search_topk_reference])
def test_rejects_bad_bits(search):
    with pytest.raises(ValueError, match="int64"):
        search(torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="words per mask"):
        search(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="2-D"):
        search(torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64), 2)


@needs_native
def test_native_rejects_bad_input():
    query, bank = torch.zeros(1, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="r must be >= 1"):
        torch.ops.memoir.mask_search_topk_native(query, bank, 0)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.memoir.mask_search_topk_native(query.int(), bank, 2)
    with pytest.raises(RuntimeError, match="words per mask"):
        torch.ops.memoir.mask_search_topk_native(query, torch.zeros(3, 4, dtype=torch.int64), 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.memoir.mask_search_topk_native(query, torch.zeros(2, 3, dtype=torch.int64).t(), 2)


@needs_native
def test_native_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration are consistent."""
    query, bank = _random_masks(3, 130, 20), _random_masks(50, 130, 20)
    op = torch.ops.memoir.mask_search_topk_native.default
    torch.library.opcheck(op, (query, bank, 4))
    torch.library.opcheck(op, (query, bank[:2], 4))
    torch.library.opcheck(op, (query, bank[:0], 4))


def test_mask_search_topk_under_torch_compile():
    query, bank = _random_masks(2, 200, 30), _random_masks(300, 200, 30)
    compiled = torch.compile(mask_search_topk, fullgraph=True)
    got, want = compiled(query, bank, 5), mask_search_topk_reference(query, bank, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _check_against_faiss(query, bank, dim, k, r):
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexBinaryFlat(dim)
    index.add(bank.numpy().view(np.uint8))
    distances, ids = index.search(query.numpy().view(np.uint8), r)
    got_index, got_overlap = mask_search_topk(query, bank, r)
    # Every mask has exactly k bits, so hamming(q, m) = 2k - 2 |q AND m|: the same ranking.
    assert (2 * k - 2 * got_overlap.numpy().astype(np.int64) == distances).all()
    _, _, overlaps = _oracle(query, bank, r)
    for b in range(query.shape[0]):
        cut = int(got_overlap[b, -1])
        above = {int(i) for i, o in zip(got_index[b], got_overlap[b], strict=True) if o > cut}
        faiss_above = {int(i) for i, d in zip(ids[b], distances[b], strict=True) if d < 2 * k - 2 * cut}
        assert above == faiss_above
        if (overlaps[b] == cut).sum() == (got_overlap[b] == cut).sum():  # no tie crosses the cut
            assert set(got_index[b].tolist()) == set(ids[b].tolist())
            assert sorted(got_index[b].tolist()) == sorted(np.flatnonzero(overlaps[b] >= cut).tolist())


@pytest.mark.parametrize("r", [1, 4, 16])
def test_equals_faiss_hamming_knn(r):
    dim, k = 1536, 439
    bank, query = _random_masks(2000, dim, k), _random_masks(8, dim, k)
    bank[1500] = query[2]
    bank[40] = query[2]
    _check_against_faiss(query, bank, dim, k, r)


def test_equals_faiss_at_llama_width():
    dim, k = 14336, 4096
    bank, query = _random_masks(300, dim, k), _random_masks(3, dim, k)
    bank[123] = query[1]
    _check_against_faiss(query, bank, dim, k, 4)
    assert mask_search_topk(query, bank, 4)[0][1, 0].item() == 123


def test_equals_faiss_with_many_ties():
    """Few set bits: most overlaps tie, so the cut usually falls inside a tie group."""
    dim, k = 256, 8
    bank, query = _random_masks(3000, dim, k), _random_masks(6, dim, k)
    _check_against_faiss(query, bank, dim, k, 10)


@pytest.mark.cuda
@pytest.mark.parametrize("n,dim,k,batch,r", [
    pytest.param(0, 130, 20, 3, 4, id="empty"), pytest.param(1, 64, 10, 1, 1, id="1x64-r1"),
    pytest.param(3, 70, 5, 2, 8, id="N3<r8"), pytest.param(37, 70, 20, 9, 5, id="37x70-B9"),
    pytest.param(5000, 130, 3, 17, 64, id="ties-r64-B17"), pytest.param(4000, 130, 20, 2, 33, id="4000x130-r33"),
    pytest.param(20000, 14336, 4096, 1, 4, id="20k-llama-B1"), pytest.param(3000, 14336, 4096, 5, 16, id="llama-B5"),
])
def test_cuda_kernel_equals_reference(n, dim, k, batch, r):
    from memoir_kernels._native import native_has_cuda

    if not native_has_cuda():
        pytest.fail("memoir_kernels._C was built without its CUDA kernels on a CUDA machine")
    bank, query = _random_masks(n, dim, k), _random_masks(batch, dim, k)
    if n > 10:
        bank[n - 1] = query[0]  # a tie with ...
        bank[n // 3] = query[0]  # ... a lower index, scored by another warp
    want = mask_search_topk_reference(query, bank, r)
    got = torch.ops.memoir.mask_search_topk_native(query.cuda(), bank.cuda(), r)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    again = torch.ops.memoir.mask_search_topk_native(query.cuda(), bank.cuda(), r)  # no state kept between calls
    assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])
    assert torch.equal(got[0][:, 0], torch.ops.memoir.mask_search_native(query.cuda(), bank.cuda())[0])


@pytest.mark.cuda
def test_cuda_r_above_kernel_limit(monkeypatch):
    query, bank = _random_masks(2, 130, 5).cuda(), _random_masks(200, 130, 5).cuda()
    with pytest.raises(RuntimeError, match="r must be at most 64"):
        torch.ops.memoir.mask_search_topk_native(query, bank, 65)
    set_backend("native")
    with pytest.raises(ValueError, match="r <= 64"):
        mask_search_topk(query, bank, 65)
    set_backend("auto")  # auto falls back to the reference beyond the limit
    got, want = mask_search_topk(query, bank, 65), mask_search_topk_reference(query.cpu(), bank.cpu(), 65)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
