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


def _oracle(query, bank):
    """Independent of the package's popcount and chunking: the int64 words viewed as little-endian
    bytes and unpacked by numpy into one bool per position (position j = bit j % 64 of word j // 64),
    overlap = count of positions set in both, best = numpy's argmax (its first maximum: the lowest
    index on ties); an empty bank gives (-1, 0)."""
    def unpacked(bits):
        as_bytes = np.ascontiguousarray(bits.numpy().astype("<i8")).view(np.uint8)
        return np.unpackbits(as_bytes, axis=1, bitorder="little").astype(bool)

    q, m = unpacked(query), unpacked(bank)
    if m.shape[0] == 0:
        return [(-1, 0)] * q.shape[0]
    common = (q[:, None, :] & m[None, :, :]).sum(axis=2)  # [B, N]
    best = common.argmax(axis=1)
    return [(int(i), int(common[b, i])) for b, i in enumerate(best)]


IMPLEMENTATIONS = [pytest.param(mask_search_reference, id="reference"), pytest.param(mask_search, id="dispatch")]


@pytest.mark.parametrize("search", IMPLEMENTATIONS)
@pytest.mark.parametrize("n,dim,k,batch", [
    pytest.param(1, 64, 10, 1, id="1x64"), pytest.param(37, 70, 20, 3, id="37x70"),
    pytest.param(200, 130, 7, 9, id="200x130-ties"), pytest.param(5000, 200, 57, 2, id="5000x200-chunks"),
])
def test_matches_oracle(search, n, dim, k, batch):
    """Every size against the numpy oracle. In the chunked case (the reference compares 4096 stored
    masks per step) query 0's own mask is stored twice, past the first chunk and inside it, so its
    best overlap is tied across chunks and the lower index must win; query 1 stays random."""
    bank, query = _random_masks(n, dim, k), _random_masks(batch, dim, k)
    if n > 4096:
        bank[4500], bank[100] = query[0], query[0]
    index, overlap = search(query, bank)
    assert index.dtype == torch.int64 and overlap.dtype == torch.int32
    assert list(zip(index.tolist(), overlap.tolist(), strict=True)) == _oracle(query, bank)
    if n > 4096:
        assert (index[0].item(), overlap[0].item()) == (100, k)


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
    got = torch.ops.memoir.mask_search_native(query, bank)
    want = mask_search_reference(query, bank)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_native_rejects_bad_input():
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.memoir.mask_search_native(torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="words per mask"):
        torch.ops.memoir.mask_search_native(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64))


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


def test_native_ties_across_thread_slices_go_to_lowest_index():
    """Equal best overlaps in different thread slices: the reduction must keep the lower index."""
    bank = _random_masks(4000, 1536, 439)
    query = bank[3000:3001].clone()
    bank[17] = query[0]
    bank[3999] = query[0]
    original = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            index, overlap = torch.ops.memoir.mask_search_native(query, bank)
            assert index.tolist() == [17] and overlap.tolist() == [439]
    finally:
        torch.set_num_threads(original)


@pytest.mark.parametrize("batch", [pytest.param(b, id=f"B{b}") for b in (1, 7, 9, 17)])
def test_native_query_groups_equal_reference(batch):
    """Batches that are not a multiple of the kernel's query group of 8."""
    bank, query = _random_masks(700, 14336 // 8, 512), _random_masks(batch, 14336 // 8, 512)
    got, want = torch.ops.memoir.mask_search_native(query, bank), mask_search_reference(query, bank)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_native_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration are consistent."""
    query, bank = _random_masks(3, 130, 20), _random_masks(50, 130, 20)
    torch.library.opcheck(torch.ops.memoir.mask_search_native.default, (query, bank))
    torch.library.opcheck(torch.ops.memoir.mask_search_native.default, (query, bank[:0]))


def test_mask_search_under_torch_compile():
    query, bank = _random_masks(2, 200, 30), _random_masks(300, 200, 30)
    compiled = torch.compile(mask_search, fullgraph=True)
    got, want = compiled(query, bank), mask_search_reference(query, bank)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_equals_faiss_at_llama_width():
    """14336-bit masks (LLaMA-3-8B's D) with k = 4096: same overlaps as faiss's Hamming search."""
    faiss = pytest.importorskip("faiss")
    dim, k = 14336, 4096
    bank, query = _random_masks(300, dim, k), _random_masks(3, dim, k)
    bank[123] = query[1]
    index = faiss.IndexBinaryFlat(dim)
    index.add(bank.numpy().view(np.uint8))
    distances, _ = index.search(query.numpy().view(np.uint8), 1)
    got_index, got_overlap = torch.ops.memoir.mask_search_native(query, bank)
    assert got_overlap.tolist() == [k - int(d) // 2 for d in distances[:, 0]]
    assert got_index[1].item() == 123


@pytest.mark.cuda
@pytest.mark.parametrize("n,dim,k,batch", [
    pytest.param(0, 130, 20, 3, id="empty"), pytest.param(1, 64, 10, 1, id="1x64"),
    pytest.param(37, 70, 20, 9, id="37x70-B9"), pytest.param(5000, 130, 7, 64, id="ties-B64"),
    pytest.param(4000, 130, 20, 2, id="4000x130-B2"),  # 4 warps per query in the final reduction
    pytest.param(20000, 14336, 4096, 1, id="20k-llama-B1"), pytest.param(3000, 14336, 4096, 17, id="llama-B17"),
])
def test_cuda_kernel_equals_reference(n, dim, k, batch):
    from memoir_kernels._native import native_has_cuda

    if not native_has_cuda():
        pytest.fail("memoir_kernels._C was built without its CUDA kernels on a CUDA machine")
    bank, query = _random_masks(n, dim, k).cuda(), _random_masks(batch, dim, k).cuda()
    if n > 10:
        bank[n - 1] = query[0]  # a tie with ...
        bank[n // 3] = query[0]  # ... a lower index, in another block's share of the bank
    got = torch.ops.memoir.mask_search_native(query, bank)
    want = mask_search_reference(query.cpu(), bank.cpu())
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    again = torch.ops.memoir.mask_search_native(query, bank)  # a second call starts from a fresh counter
    assert torch.equal(again[0], got[0])


@pytest.mark.cuda
def test_cuda_searches_on_two_streams_keep_their_own_counters():
    """Two searches in flight at once on two streams, many times over: each launch counts its finished
    blocks in its own per-call counter, so neither can see the other's blocks and reduce too early
    (or never). Both answers equal the reference every time. Without a GPU, `make native-check`
    compiles the kernel for sm_90 instead."""
    from memoir_kernels._native import native_has_cuda

    if not native_has_cuda():
        pytest.fail("memoir_kernels._C was built without its CUDA kernels on a CUDA machine")
    dim, k = 14336, 4096
    bank_a, query_a = _random_masks(20000, dim, k), _random_masks(1, dim, k)
    bank_b, query_b = _random_masks(12000, dim, k), _random_masks(5, dim, k)
    bank_a[15000] = query_a[0]  # exact matches in a late block's share of each bank
    bank_b[9000] = query_b[2]
    want = {"a": mask_search_reference(query_a, bank_a), "b": mask_search_reference(query_b, bank_b)}
    inputs = {"a": (query_a.cuda(), bank_a.cuda()), "b": (query_b.cuda(), bank_b.cuda())}
    streams = {"a": torch.cuda.Stream(), "b": torch.cuda.Stream()}
    for stream in streams.values():
        stream.wait_stream(torch.cuda.current_stream())  # the inputs were copied on the default stream
    results = []
    for _ in range(25):
        for name in ("a", "b"):
            with torch.cuda.stream(streams[name]):
                results.append((name, torch.ops.memoir.mask_search_native(*inputs[name])))
    torch.cuda.synchronize()
    for name, (index, overlap) in results:
        assert torch.equal(index.cpu(), want[name][0]) and torch.equal(overlap.cpu(), want[name][1]), name


@pytest.mark.cuda
def test_cuda_search_replays_in_a_cuda_graph():
    """The counter's zeroing is a memset on the call's stream, so one captured search replays with
    new queries and still reduces once per replay."""
    dim, k = 14336, 4096
    bank = _random_masks(5000, dim, k).cuda()
    query = _random_masks(3, dim, k).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graph expects
        torch.ops.memoir.mask_search_native(query, bank)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        index, overlap = torch.ops.memoir.mask_search_native(query, bank)
    for step in range(3):
        fresh = _random_masks(3, dim, k).cuda()
        fresh[1] = bank[1000 * step + 7]
        query.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        want = mask_search_reference(query.cpu(), bank.cpu())
        assert torch.equal(index.cpu(), want[0]) and torch.equal(overlap.cpu(), want[1])
        assert index[1].item() == 1000 * step + 7 and overlap[1].item() == k
