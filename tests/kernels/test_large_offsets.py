"""Offsets past 2^31 elements in every Triton kernel, with a few kilobytes of real memory.

In int32, ``token * row_stride`` wraps once a tensor spans 2^31 elements: 150k tokens at
D = 14336. Allocating that much to test it is not possible here, and faking it with a view whose
addresses lie outside its storage would read memory that does not belong to the tensor. What is
honest: the kernels take each activation/output row stride as an argument (any row-strided view
goes in without a copy), so a handful of rows placed 2^31 elements apart exercises exactly the
arithmetic of a contiguous 150k-token batch: row index times row stride, both of int32 size,
product past 2^31. The rows lie in one storage that really spans those addresses; ``torch.empty``
reserves it as virtual memory and only the pages of the rows written are ever backed, which the
test checks (resident memory grows by less than 64 MiB while the tensors span 4 GiB and more).

Each case asserts three things:
* the kernel read (or wrote) addresses more than 2^31 elements past the storage's start (a load
  recorder on the interpreter), so the view was not silently copied to a small contiguous tensor;
* its result equals, bit for bit, the same kernel on a contiguous copy of the same rows (offsets
  below 2^31): the same arithmetic, so any wrapped offset would show as other values read;
* and the contiguous result's usual check against the reference.

Checked against the same kernels with their int64 casts removed: every case but the token-stride
TopHash one (whose loop advances a pointer: no product to wrap) then reads before the storage's
start, which under the interpreter ends the process with a segmentation fault: a loud failure,
not a silent pass. The sm_90 compile of the kernels with int64 sizes and strides is in
test_triton_sm90_compile.py.
"""

import contextlib
import os

import pytest
import torch

from memoir_kernels import (
    memoir_down_proj,
    memoir_down_proj_reference,
    memoir_down_proj_routed,
    memoir_down_proj_routed_reference,
    pack_bits,
    tophash,
    tophash_reference,
    tophash_residual,
    tophash_residual_reference,
)
from memoir_kernels._triton import interpreting

from .helpers import kernel_device as _device

INT32_LIMIT = 2**31
RESIDENT_GROWTH_LIMIT = 64 * 2**20


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _small_resident_growth():
    """Fails if the process's resident memory grows by RESIDENT_GROWTH_LIMIT or more (CPU only:
    on a GPU the reserved storage is real device memory, and host memory is not the question)."""
    before = _resident_bytes()
    yield
    after = _resident_bytes()
    if before is not None and after is not None and _device() == "cpu":
        assert after - before < RESIDENT_GROWTH_LIMIT, f"resident memory grew by {(after - before) / 2**20:.0f} MiB"


class _Sparse:
    """One storage spanning ``span`` elements of which only a few rows are ever written."""

    def __init__(self, span: int, dtype: torch.dtype):
        # torch.empty does not touch its memory, unless asked to fill uninitialized memory in
        # deterministic mode, which would back all of it.
        assert not (torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory)
        self.storage = torch.empty(span, dtype=dtype, device=_device())
        self.start = self.storage.data_ptr()
        self.end = self.start + span * self.storage.element_size()

    def view(self, size, stride, offset, values):
        view = self.storage.as_strided(size, stride, offset)
        assert view.storage_offset() + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) < self.storage.numel()
        view.copy_(values)
        return view


@contextlib.contextmanager
def _farthest_access(sparse: _Sparse):
    """Records the largest element offset into ``sparse``'s storage that the kernels load from or
    store to (interpreter only; on a GPU yields a holder that stays None)."""
    holder = {"offset": None}
    if not interpreting():
        yield holder
        return
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    size = sparse.storage.element_size()

    def note(ptrs, mask):
        addresses = np.asarray(ptrs.data)[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)]
        inside = addresses[(addresses >= sparse.start) & (addresses < sparse.end)]
        if inside.size:
            farthest = int((int(inside.max()) - sparse.start) // size)
            holder["offset"] = max(holder["offset"] or 0, farthest)

    def recording_load(ptrs, mask, *args):
        note(ptrs, mask)
        return load(ptrs, mask, *args)

    def recording_store(ptrs, value, mask, *args):
        note(ptrs, mask)
        return store(ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = recording_load, recording_store
    try:
        yield holder
    finally:
        del builder.create_masked_load, builder.create_masked_store  # back to the class's methods


def _assert_past_int32(holder):
    if holder["offset"] is not None or interpreting():
        assert holder["offset"] is not None and holder["offset"] >= INT32_LIMIT, holder["offset"]


def _row_stride(rows: int, extra: int) -> int:
    """A row stride of int32 size whose last row starts past 2^31 elements."""
    stride = -(-INT32_LIMIT // (rows - 1)) + extra
    assert stride < INT32_LIMIT <= (rows - 1) * stride
    return stride


DIM, HIDDEN = 64, 32


@pytest.mark.parametrize("tokens_per_row,rows", [pytest.param(1, 4, id="gather-T4"), pytest.param(5, 4, id="dense-T20")])
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_routed_down_projection_rows_2_31_apart(triton_backend, tokens_per_row, rows, in_place):
    """Activations and base output interleaved in one storage, row t of each at t * stride: the
    routed projection reads both there and, in place, writes the gated rows back there."""
    tokens = tokens_per_row * rows
    stride = _row_stride(tokens, DIM + HIDDEN)
    dtype = torch.float16
    device = _device()
    a_values = torch.randn(tokens, DIM, device=device).to(dtype)
    memory = torch.randn(DIM, HIDDEN, device=device)
    bank_bits = pack_bits(torch.rand(3, DIM, device=device) < 0.3)
    index = torch.tensor([0, 2, 1, 2], device=device)
    overlap = torch.tensor([12, 3, 9, 15], dtype=torch.int32, device=device)  # rows 0 and 3 (the far one) gated
    base_values = torch.nn.functional.linear(a_values, torch.randn(HIDDEN, DIM, device=device).to(dtype))
    args = (memory, tokens_per_row, bank_bits, index, overlap, 10)
    with _small_resident_growth():
        sparse = _Sparse((tokens - 1) * stride + DIM + HIDDEN, dtype)
        a = sparse.view((tokens, DIM), (stride, 1), 0, a_values)
        base = sparse.view((tokens, HIDDEN), (stride, 1), DIM, base_values)
        with _farthest_access(sparse) as farthest:
            got = memoir_down_proj_routed(a, *args, base=base, in_place=in_place)
        _assert_past_int32(farthest)
        assert (got is base) == in_place
        want = memoir_down_proj_routed(a_values, *args, base=base_values.clone())
        assert torch.equal(got, want)
        torch.testing.assert_close(want, memoir_down_proj_routed_reference(a_values, *args, base=base_values),
                                   rtol=1e-2, atol=1e-2)
        del sparse, a, base, got


@pytest.mark.parametrize("tokens", [pytest.param(3, id="gather"), pytest.param(20, id="dense")])
def test_down_projection_with_fused_base_rows_2_31_apart(triton_backend, tokens):
    """The fused W0 product reads the far rows too (its output is a fresh contiguous tensor)."""
    stride = _row_stride(tokens, DIM)
    device = _device()
    a_values = torch.randn(tokens, DIM, device=device).to(torch.float16)
    weight = torch.randn(HIDDEN, DIM, device=device).to(torch.float16)
    memory = torch.randn(DIM, HIDDEN, device=device)
    rows = torch.arange(tokens, device=device) % 2
    bits, gate = pack_bits(torch.rand(2, DIM, device=device) < 0.3), torch.tensor([True, False], device=device)
    with _small_resident_growth():
        sparse = _Sparse((tokens - 1) * stride + DIM, torch.float16)
        a = sparse.view((tokens, DIM), (stride, 1), 0, a_values)
        with _farthest_access(sparse) as farthest:
            got = memoir_down_proj(a, weight, memory, rows, bits, gate)
        _assert_past_int32(farthest)
        want = memoir_down_proj(a_values, weight, memory, rows, bits, gate)
        assert torch.equal(got, want)
        torch.testing.assert_close(want, memoir_down_proj_reference(a_values, weight, memory, rows, bits, gate),
                                   rtol=1e-2, atol=1e-2)
        del sparse, a


@pytest.mark.parametrize("batch,tokens", [pytest.param(3, 1, id="sequences"), pytest.param(1, 3, id="tokens")])
def test_tophash_sequences_or_tokens_2_31_apart(triton_backend, batch, tokens):
    """Sequences (batch stride) or tokens (token stride) 2^30 + D elements apart: the last one's
    index times its stride passes 2^31. Quarter-step activations make every key sum exact, so the
    masks must equal the reference's exactly."""
    dim, k = 200, 57
    far = 2**30 + dim
    strides = (far, dim, 1) if batch > 1 else (dim, far, 1)  # (a stride of a size-1 dimension is never used)
    last = (batch - 1) * strides[0] + (tokens - 1) * strides[1]
    assert max(strides) < INT32_LIMIT <= last
    device = _device()
    values = (torch.randint(-8, 8, (batch, tokens, dim)) / 4).to(torch.float16).to(device)
    window = torch.rand(batch, tokens, device=device) < 0.7
    window[:, -1] = True
    mu, perm = (torch.randint(-4, 4, (dim,)) / 8).to(device), torch.randperm(dim).to(device)
    with _small_resident_growth():
        sparse = _Sparse(last + dim, torch.float16)
        acts = sparse.view((batch, tokens, dim), strides, 0, values)
        with _farthest_access(sparse) as farthest:
            got = tophash(acts, window, mu, perm, k)
        _assert_past_int32(farthest)
        assert torch.equal(got, tophash(values, window, mu, perm, k))
        assert torch.equal(got, tophash_reference(values, window, mu, perm, k))
        del sparse, acts


def test_fused_tophash_residual_rows_2_31_apart(triton_backend):
    """The fused editing kernel's activation rows at t * stride, stride of int32 size."""
    tokens, k = 20, 20
    stride = _row_stride(tokens, DIM)
    device = _device()
    values = torch.randn(tokens, DIM, device=device).to(torch.float16)
    key, perm = torch.randn(DIM, device=device), torch.randperm(DIM, device=device)
    memory = torch.randn(DIM, HIDDEN, device=device)
    with _small_resident_growth():
        sparse = _Sparse((tokens - 1) * stride + DIM, torch.float16)
        acts = sparse.view((tokens, DIM), (stride, 1), 0, values)
        with _farthest_access(sparse) as farthest:
            got = tophash_residual(key, perm, k, acts, memory)
        _assert_past_int32(farthest)
        want = tophash_residual(key, perm, k, values, memory)
        assert torch.equal(got, want)
        torch.testing.assert_close(want, tophash_residual_reference(key, perm, k, values, memory), rtol=1e-2, atol=1e-2)
        del sparse, acts


def test_the_sparse_storage_is_not_backed():
    """The premise of the tests above: a 4 GiB storage with a few rows written costs a few pages."""
    if _device() != "cpu" or _resident_bytes() is None:
        pytest.skip("resident memory is read from /proc on CPU")
    with _small_resident_growth():
        sparse = _Sparse(INT32_LIMIT + DIM, torch.float16)
        view = sparse.view((2, DIM), (INT32_LIMIT, 1), 0, torch.ones(2, DIM, dtype=torch.float16))
        assert view.sum().item() == 2 * DIM
        del sparse, view
