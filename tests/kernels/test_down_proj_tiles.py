"""Ungated tokens cost no residual work in the edited down projection.

The dense kernel must skip, per tile of tokens, the mask words, the W_m tile and the residual
product when no token of the tile is gated; the gather kernel skips an ungated token. Two kinds of
evidence, both under the Triton interpreter on CPU (the GPU run keeps the first only):

* W_m full of NaN: a NaN read into any ungated token's arithmetic would show in its output, so
  ungated rows must be the base output bit for bit (gated rows are NaN, as they must be).
* A recorder on the interpreter's loads, stores and dot products: no program whose tile holds no
  gated token reads an address of W_m or multiplies by a NaN (W_m) operand, and in place nothing
  is written to an ungated row. This is what the NaN check alone cannot see: before the skip the
  dense kernel multiplied the NaN tile into every row and discarded it with ``where``, which left
  the outputs right and the cost there (the recorder check fails on that kernel).
"""

import contextlib

import pytest
import torch

from memoir_kernels import (
    memoir_down_proj,
    memoir_down_proj_reference,
    memoir_down_proj_routed,
    memoir_down_proj_routed_reference,
    pack_bits,
)

from .helpers import kernel_device as _device

DIM, HIDDEN = 70, 33


class _Recorder:
    """Which programs (grid x index) read W_m, multiplied by a NaN operand, or wrote each address."""

    def __init__(self, memory: torch.Tensor):
        self.memory_range = (memory.data_ptr(), memory.data_ptr() + memory.numel() * memory.element_size())
        self.memory_loads: set[int] = set()
        self.nan_dots: set[int] = set()
        self.stores: list[tuple[int, object]] = []


@contextlib.contextmanager
def _record(monkeypatch, memory):
    """Wraps the interpreter's masked load, store and dot for the duration of the block."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    recorder = _Recorder(memory)
    load, store, dot = builder.create_masked_load, builder.create_masked_store, builder.create_dot
    low, high = recorder.memory_range

    def recording_load(ptrs, mask, *args):
        addresses = np.asarray(ptrs.data)[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)]
        if ((addresses >= low) & (addresses < high)).any():
            recorder.memory_loads.add(builder.grid_idx[0])
        return load(ptrs, mask, *args)

    def recording_store(ptrs, value, mask, *args):
        addresses = np.asarray(ptrs.data)[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)]
        recorder.stores.append((builder.grid_idx[0], addresses.astype(np.uint64)))
        return store(ptrs, value, mask, *args)

    def recording_dot(a, b, *args):
        if np.isnan(np.asarray(b.data, dtype=np.float64)).any():
            recorder.nan_dots.add(builder.grid_idx[0])
        return dot(a, b, *args)

    monkeypatch.setattr(builder, "create_masked_load", recording_load)
    monkeypatch.setattr(builder, "create_masked_store", recording_store)
    monkeypatch.setattr(builder, "create_dot", recording_dot)
    yield recorder


def _interpreted() -> bool:
    from memoir_kernels._triton import interpreting

    return interpreting()


# Sequences of L tokens; which are gated. Dense, 40 tokens in tiles of 16 (the interpreter's
# BLOCK_T): tile 0 = sequences 0-1 (none gated), tile 1 = sequences 2-3 (2 gated, 3 not: mixed),
# tile 2 = sequence 4 (not gated). Gather, 8 tokens of 2: one program per token.
CASES = {
    "dense": (8, [False, False, True, False, False]),
    "gather": (2, [False, True, False, False]),
}
MODES = ["routed", "routed-in-place", "given-base", "fused-base"]


def _problem(regime, dtype=torch.float32, memory_value=float("nan")):
    per_row, gated_rows = CASES[regime]
    rows = len(gated_rows)
    device = _device()
    a = torch.randn(rows * per_row, DIM, device=device).to(dtype)
    weight = torch.randn(HIDDEN, DIM, device=device).to(dtype)
    bias = torch.randn(HIDDEN, device=device).to(dtype)
    memory = torch.full((DIM, HIDDEN), memory_value, device=device)
    bank_bits = pack_bits(torch.rand(3, DIM, device=device) < 0.3)
    index = torch.tensor([i % 3 for i in range(rows)], device=device)
    overlap = torch.tensor([20 if g else 5 for g in gated_rows], dtype=torch.int32, device=device)
    gate = torch.tensor(gated_rows, device=device)
    base = torch.nn.functional.linear(a, weight, bias)
    return dict(a=a, weight=weight, bias=bias, memory=memory, bank_bits=bank_bits, index=index, overlap=overlap,
                gate=gate, base=base, per_row=per_row, gated_tokens=gate.repeat_interleave(per_row))


def _run(mode, p):
    """The projection in ``mode``; returns (output, the tensor the kernel writes, base to compare)."""
    if mode in ("routed", "routed-in-place"):
        base = p["base"].clone()
        out = memoir_down_proj_routed(p["a"], p["memory"], p["per_row"], p["bank_bits"], p["index"], p["overlap"], 10,
                                      base=base, in_place=mode == "routed-in-place")
        return out, p["base"]
    bits = p["bank_bits"][p["index"]]
    if mode == "given-base":
        return memoir_down_proj(p["a"], None, p["memory"], p["per_row"], bits, p["gate"], base=p["base"]), p["base"]
    return memoir_down_proj(p["a"], p["weight"], p["memory"], p["per_row"], bits, p["gate"], p["bias"]), None


def _tiles_with_a_gated_token(gated_tokens, regime):
    from memoir_kernels.down_proj import INTERPRETER_DENSE_TILES

    block = INTERPRETER_DENSE_TILES["BLOCK_T"] if regime == "dense" else 1
    tiles = gated_tokens.cpu().split(block)
    return {i for i, tile in enumerate(tiles) if tile.any()}, len(tiles)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("regime", list(CASES))
def test_nan_memory_is_never_read_for_ungated_tokens(triton_backend, monkeypatch, regime, mode):
    p = _problem(regime)
    gated = p["gated_tokens"]
    recording = _record(monkeypatch, p["memory"]) if _interpreted() else contextlib.nullcontext()
    with recording as recorder:
        got, base = _run(mode, p)
    if base is None:  # the kernel's own fused W0 product: the same call with a finite W_m
        finite = dict(p, memory=torch.zeros_like(p["memory"]))
        base, _ = _run(mode, finite)
    assert torch.equal(got[~gated], base[~gated])  # bit for bit, no NaN leaked in
    assert torch.isnan(got[gated]).all()  # gated rows did read W_m (NaN): expected
    if recorder is None:
        return
    needed, programs = _tiles_with_a_gated_token(gated, regime)
    assert 0 < len(needed) < programs  # the case has tiles of both kinds
    assert recorder.memory_loads == needed  # W_m read by exactly the tiles with a gated token
    assert recorder.nan_dots <= needed  # and multiplied only there (the gather kernel uses no dot)
    if regime == "dense":
        assert recorder.nan_dots == needed


@pytest.mark.parametrize("regime", list(CASES))
def test_in_place_writes_only_gated_rows(triton_backend, monkeypatch, regime):
    """In place the base output of an ungated token is neither copied nor rewritten: every store
    the kernel makes lands in a gated token's row of ``base``."""
    if not _interpreted():
        pytest.skip("the store recorder needs the interpreter")
    p = _problem(regime, memory_value=0.5)
    base = p["base"].clone()
    with _record(monkeypatch, p["memory"]) as recorder:
        out = memoir_down_proj_routed(p["a"], p["memory"], p["per_row"], p["bank_bits"], p["index"], p["overlap"], 10,
                                      base=base, in_place=True)
    assert out is base
    row_bytes = base.stride(0) * base.element_size()
    written_rows = set()
    for _, addresses in recorder.stores:
        written_rows |= {int(x) for x in (addresses - base.data_ptr()) // row_bytes}
    assert written_rows == set(p["gated_tokens"].nonzero().flatten().tolist())
    assert torch.equal(base[~p["gated_tokens"]], p["base"][~p["gated_tokens"]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("regime", list(CASES))
def test_in_place_equals_out_of_place(triton_backend, regime, dtype):
    """Same arithmetic in both forms: the in-place result equals the out-of-place one bit for bit,
    and the reference's within its rounding."""
    p = _problem(regime, dtype=dtype, memory_value=0.0)
    p["memory"] = torch.randn_like(p["memory"])
    args = (p["a"], p["memory"], p["per_row"], p["bank_bits"], p["index"], p["overlap"], 10)
    out_of_place = memoir_down_proj_routed(*args, base=p["base"])
    base = p["base"].clone()
    in_place = memoir_down_proj_routed(*args, base=base, in_place=True)
    assert in_place is base and torch.equal(in_place, out_of_place)
    ref = memoir_down_proj_routed_reference(*args, base=p["base"])
    torch.testing.assert_close(in_place.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_in_place_on_a_layout_it_cannot_write_copies_the_result(triton_backend):
    """A base whose row elements are not adjacent (a transposed buffer) is written through a copy."""
    p = _problem("dense", memory_value=0.0)
    p["memory"] = torch.randn_like(p["memory"])
    args = (p["a"], p["memory"], p["per_row"], p["bank_bits"], p["index"], p["overlap"], 10)
    base = p["base"].t().contiguous().t()  # [T, d] with strides (1, T)
    assert base.stride(1) != 1
    got = memoir_down_proj_routed(*args, base=base, in_place=True)
    assert got is base
    assert torch.equal(got, memoir_down_proj_routed(*args, base=p["base"]))


def test_reference_in_place_writes_base():
    p = _problem("gather", memory_value=0.0)
    p["memory"] = torch.randn_like(p["memory"])
    args = (p["a"], p["memory"], p["per_row"], p["bank_bits"], p["index"], p["overlap"], 10)
    base = p["base"].clone()
    got = memoir_down_proj_routed_reference(*args, base=base, in_place=True)
    assert got is base and torch.equal(got, memoir_down_proj_routed_reference(*args, base=p["base"]))


def test_in_place_op_passes_opcheck(triton_backend):
    p = _problem("gather", memory_value=0.0)
    utils = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.memoir.down_proj_routed_triton_.default,
                          (p["a"], p["memory"], None, p["per_row"], p["bank_bits"], p["index"], p["overlap"], 10,
                           p["base"].clone()), test_utils=utils)


def test_all_ungated_dense_call_equals_reference_exactly(triton_backend):
    """Nothing gated at all (the unrelated prompt's prefill): the fused base product alone, and a
    given base comes back unchanged."""
    p = _problem("dense", memory_value=float("nan"))
    none = torch.zeros_like(p["overlap"])
    got = memoir_down_proj_routed(p["a"], p["memory"], p["per_row"], p["bank_bits"], p["index"], none, 10,
                                  base=p["base"])
    assert torch.equal(got, p["base"])
    bits = p["bank_bits"][p["index"]]
    fused = memoir_down_proj(p["a"], p["weight"], p["memory"], p["per_row"], bits, torch.zeros_like(p["gate"]), p["bias"])
    want = memoir_down_proj_reference(p["a"], p["weight"], p["memory"].nan_to_num(), p["per_row"], bits,
                                      torch.zeros_like(p["gate"]), p["bias"])
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-4)
