"""The edited down projection.

y_t = W0 a_t (+ bias) + gate[r_t] * W_m^T (mask[r_t] * a_t),  r_t = row_of_token[t],
with W0 ``[d, D]`` (nn.Linear layout) and W_m stored ``[D, d]`` so a selected column is one row.
Ungated tokens are exactly the base output (``where``, not a multiply by a zero gate), and cost
no residual work: the gather kernel skips a token that is not gated, the dense kernel a tile of
tokens none of which is gated (no mask word, no W_m tile, no second product).

The routed variant takes the mask search's result as it is: mask[r] = bank[index[r]] and
gate[r] = overlap[r] >= min_overlap are read and compared inside the kernel, so the edited layer's
routed forward launches nothing between the search and the projection.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._bits import num_words, unpack_bits
from ._triton import HAS_TRITON, interpreting
from .backend import resolve_backend

__all__ = [
    "memoir_down_proj",
    "memoir_down_proj_reference",
    "memoir_down_proj_routed",
    "memoir_down_proj_routed_reference",
    "masked_residual",
]

# At most this many tokens: the gather regime (each token reads only its k selected rows of W_m).
# Above: the dense regime (a tiled matrix product on masked activations), where a W_m tile read
# once serves many tokens and beats per-token gathers.
DECODE_MAX_TOKENS = 16


def autotune_enabled() -> bool:
    """Whether the Triton kernels pick their tiles by autotuning on the first call of each shape
    (``MEMOIR_TRITON_AUTOTUNE``, default on; ``0`` uses the first candidate tile, which starts
    faster: no benchmarking, one compilation per variant)."""
    return os.environ.get("MEMOIR_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no")


def masked_residual(a: torch.Tensor, memory: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """Residual ``(mask * a) @ W_m`` for ``a [T, D]`` (or ``[B, T, D]``), ``memory [D, d]`` and
    ``token_masks`` bool, ``[T, D]`` or broadcastable to ``a`` (``[B, 1, D]``: one mask per row).

    Computed in the memory's dtype and returned in ``a``'s: the PyTorch form of the editing
    forward's residual (the CPU path; GPUs run :func:`memoir_kernels.tophash_residual`).
    """
    return ((a.to(memory.dtype) * token_masks.to(memory.dtype)) @ memory).to(a.dtype)


def memoir_down_proj_reference(
    a: torch.Tensor,
    weight: torch.Tensor | None,
    memory: torch.Tensor,
    row_of_token: torch.Tensor | int,
    bits: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch edited down projection; same contract as :func:`memoir_down_proj`."""
    _check_inputs(a, weight, memory, row_of_token, bits, gate, base)
    if base is None:
        base = F.linear(a, weight, bias)
    if bits.shape[0] == 0:
        return base
    rows = _rows_tensor(row_of_token, a)
    residual = masked_residual(a, memory, unpack_bits(bits, a.shape[1])[rows])
    # where() rather than gate * residual: an ungated token must equal the base output exactly.
    return torch.where(gate[rows].unsqueeze(1), base + residual, base)


def memoir_down_proj(
    a: torch.Tensor,
    weight: torch.Tensor | None,
    memory: torch.Tensor,
    row_of_token: torch.Tensor | int,
    bits: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edited down projection of a flat batch of tokens.

    Args:
        a: ``[T, D]`` activations entering the down projection.
        weight: ``[d, D]`` base weight W0 (``nn.Linear`` layout); may be ``None`` when ``base`` is given.
        memory: ``[D, d]`` residual memory W_m (transposed layout: column i of W_m is row i here).
        row_of_token: ``[T]`` int64, the sequence (row of ``bits``/``gate``) each token belongs to;
            or an int ``L``: the tokens are ``R`` sequences of ``L`` tokens each, token t in row t // L
            (the edited layer's case; saves building the index tensor on the device).
        bits: ``[R, ceil(D / 64)]`` int64 packed masks, one per sequence.
        gate: ``[R]`` bool, whether each sequence uses the memory.
        bias: ``[d]`` or ``None``.
        base: optional ``[T, d]`` base output already computed (by the original module, so that
            ungated tokens are that module's output bit for bit); W0 and bias are then not used.
            ``a`` and ``base`` may be row-strided views (each row's elements adjacent): not copied.

    Returns:
        ``[T, d]`` outputs in ``a``'s dtype. The Triton kernel picks its regime from ``T``: up to
        ``DECODE_MAX_TOKENS`` tokens it reads only the selected rows of ``memory``; above, a tiled
        product on masked activations.

    Example:
        >>> y = memoir_down_proj(a, layer.weight, memory, rows, bits, gate, layer.bias)
    """
    _check_inputs(a, weight, memory, row_of_token, bits, gate, base)
    if bits.shape[0] == 0 and base is not None:
        return base
    rows, per_row = _split_rows(row_of_token)
    return torch.ops.memoir.memoir_down_proj(a, weight, memory, rows, per_row, bits, gate, bias, base)


def memoir_down_proj_routed_reference(
    a: torch.Tensor,
    memory: torch.Tensor,
    row_of_token: torch.Tensor | int,
    bank_bits: torch.Tensor,
    index: torch.Tensor,
    overlap: torch.Tensor,
    min_overlap: int,
    *,
    base: torch.Tensor,
    in_place: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch routed down projection; same contract as :func:`memoir_down_proj_routed`."""
    _check_routed_inputs(a, memory, row_of_token, bank_bits, index, overlap, base)
    if bank_bits.shape[0] == 0:  # nothing stored: no row is gated (and index holds -1)
        return base
    out = memoir_down_proj_reference(a, None, memory, row_of_token, bank_bits[index], overlap >= min_overlap,
                                     base=base)
    return base.copy_(out) if in_place else out


def memoir_down_proj_routed(
    a: torch.Tensor,
    memory: torch.Tensor,
    row_of_token: torch.Tensor | int,
    bank_bits: torch.Tensor,
    index: torch.Tensor,
    overlap: torch.Tensor,
    min_overlap: int,
    *,
    base: torch.Tensor,
    in_place: bool = False,
) -> torch.Tensor:
    """Edited down projection of routed sequences: the mask search's result goes in as it is.

    ``memoir_down_proj(a, None, memory, row_of_token, bank_bits[index], overlap >= min_overlap,
    base=base)`` with the gather and the comparison done inside the kernel: the edited layer's
    routed forward is then three launches (TopHash, mask search, this), none reading back.

    Args:
        a: ``[T, D]`` activations entering the down projection.
        memory: ``[D, d]`` residual memory W_m (transposed layout, as in :func:`memoir_down_proj`).
        row_of_token: ``[T]`` int64 sequence of each token, or an int ``L``: ``R`` sequences of
            ``L`` tokens each (token t in sequence t // L).
        bank_bits: ``[N, ceil(D / 64)]`` int64 stored masks (``N`` may be 0: nothing is gated).
        index: ``[R]`` int64 stored mask of each sequence (:func:`mask_search`'s index).
        overlap: ``[R]`` int32 common positions with that mask (:func:`mask_search`'s overlap).
        min_overlap: the gate: sequence r uses the memory iff ``overlap[r] >= min_overlap``.
        base: ``[T, d]`` base output of the original module; ungated tokens are it bit for bit.
            ``a`` and ``base`` may be row-strided views (each row contiguous): no copy is made.
        in_place: write the edited rows into ``base`` and return it. The Triton kernel then neither
            reads nor writes an ungated token (an unrelated prompt's prefill costs the gate reads,
            not a copy of the base output), when ``base`` is in ``a``'s dtype with rows that do not
            overlap; otherwise the result is computed aside and copied into ``base``. Only for a
            ``base`` that nothing else still needs (not one autograd saved).

    Returns:
        ``[T, d]`` outputs in ``a``'s dtype (``base`` itself when the bank is empty or ``in_place``).
        The Triton kernel picks its regime from ``T`` as :func:`memoir_down_proj` does; in the
        dense regime a tile of tokens none of which is gated reads no mask and no W_m.

    Example:
        >>> index, overlap = mask_search(query_bits, bank_bits)
        >>> y = memoir_down_proj_routed(a, memory, seq_len, bank_bits, index, overlap, 220, base=layer(a))
    """
    _check_routed_inputs(a, memory, row_of_token, bank_bits, index, overlap, base)
    if bank_bits.shape[0] == 0:  # nothing stored: no row is gated (and index holds -1)
        return base
    rows, per_row = _split_rows(row_of_token)
    args = (a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base)
    if in_place:
        torch.ops.memoir.memoir_down_proj_routed_(*args)
        return base
    return torch.ops.memoir.memoir_down_proj_routed(*args)


def _split_rows(row_of_token) -> tuple[torch.Tensor | None, int]:
    """``row_of_token`` as the registered ops take it: ``(tensor, 0)`` or ``(None, L)``."""
    return (row_of_token, 0) if torch.is_tensor(row_of_token) else (None, int(row_of_token))


def _use_triton(a: torch.Tensor, base: torch.Tensor | None) -> bool:
    # Decided on shapes only: no device value is read. The kernel writes in a's dtype; a base of
    # another dtype keeps its own through the reference.
    return (a.shape[0] > 0 and (base is None or base.dtype == a.dtype)
            and resolve_backend("memoir_down_proj", a.device) == "triton")


# ----------------------------------------------------------------------------- the registered ops
# memoir::memoir_down_proj, memoir::memoir_down_proj_routed and its in-place form: the PyTorch
# references for every device, the Triton kernels where the backend switch says triton. The
# public functions return ``base`` itself for an empty bank before calling them (an op's output
# never aliases its inputs).
@torch.library.custom_op("memoir::memoir_down_proj", mutates_args=())
def _down_proj_op(a: torch.Tensor, weight: torch.Tensor | None, memory: torch.Tensor, rows: torch.Tensor | None,
                  per_row: int, bits: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None,
                  base: torch.Tensor | None) -> torch.Tensor:
    return _down_proj_reference_fresh(a, weight, memory, rows, per_row, bits, gate, bias, base)


@_down_proj_op.register_kernel(("cpu", "cuda"))
def _(a, weight, memory, rows, per_row, bits, gate, bias, base):
    if not (bits.shape[0] and _use_triton(a, base)):
        return _down_proj_reference_fresh(a, weight, memory, rows, per_row, bits, gate, bias, base)
    return torch.ops.memoir.down_proj_triton(
        _rows_contiguous(a), None if weight is None else weight.contiguous(), memory.contiguous(),
        None if rows is None else rows.contiguous(), per_row, bits.contiguous(), gate.contiguous(), bias,
        None if base is None else _rows_contiguous(base),
    )


@_down_proj_op.register_fake
def _(a, weight, memory, rows, per_row, bits, gate, bias, base):
    return a.new_empty(a.shape[0], memory.shape[1]) if base is None else torch.empty_like(base)


def _down_proj_reference_fresh(a, weight, memory, rows, per_row, bits, gate, bias, base) -> torch.Tensor:
    out = memoir_down_proj_reference(a, weight, memory, rows if per_row == 0 else per_row, bits, gate, bias,
                                     base=base)
    return out.clone() if out is base else out


@torch.library.custom_op("memoir::memoir_down_proj_routed", mutates_args=())
def _routed_op(a: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor | None, per_row: int,
               bank_bits: torch.Tensor, index: torch.Tensor, overlap: torch.Tensor, min_overlap: int,
               base: torch.Tensor) -> torch.Tensor:
    return _routed_reference(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base, False)


@_routed_op.register_kernel(("cpu", "cuda"))
def _(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base):
    if not _use_triton(a, base):
        return _routed_reference(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base, False)
    return torch.ops.memoir.down_proj_routed_triton(*_routed_triton_args(a, memory, rows, per_row, bank_bits, index,
                                                                         overlap, min_overlap), _rows_contiguous(base))


@_routed_op.register_fake
def _(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base):
    return torch.empty_like(base)


@torch.library.custom_op("memoir::memoir_down_proj_routed_", mutates_args=("base",))
def _routed_in_place_op(a: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor | None, per_row: int,
                        bank_bits: torch.Tensor, index: torch.Tensor, overlap: torch.Tensor, min_overlap: int,
                        base: torch.Tensor) -> None:
    _routed_reference(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base, True)


@_routed_in_place_op.register_kernel(("cpu", "cuda"))
def _(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base):
    if not _use_triton(a, base):
        _routed_reference(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base, True)
        return
    args = _routed_triton_args(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap)
    if _writable_rows(base):  # ungated tokens are neither read nor written
        torch.ops.memoir.down_proj_routed_triton_(*args, base)
    else:
        base.copy_(torch.ops.memoir.down_proj_routed_triton(*args, _rows_contiguous(base)))


@_routed_in_place_op.register_fake
def _(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base):
    return None


def _routed_reference(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap, base, in_place: bool):
    out = memoir_down_proj_routed_reference(a, memory, rows if per_row == 0 else per_row, bank_bits, index, overlap,
                                            min_overlap, base=base, in_place=in_place)
    return out.clone() if out is base and not in_place else out


def _routed_triton_args(a, memory, rows, per_row, bank_bits, index, overlap, min_overlap) -> tuple:
    return (_rows_contiguous(a), memory.contiguous(), None if rows is None else rows.contiguous(), per_row,
            bank_bits.contiguous(), index.contiguous(), overlap.contiguous(), min_overlap)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x [T, n]`` as the kernels read it: any row stride (a view of every other row, of a wider
    buffer ...) with each row's elements adjacent. A copy only when they are not."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _writable_rows(x: torch.Tensor) -> bool:
    """Whether the kernel can write ``x [T, n]`` in place: adjacent elements, rows not overlapping."""
    return (x.shape[1] <= 1 or x.stride(1) == 1) and (x.shape[0] <= 1 or x.stride(0) >= x.shape[1])


def _rows_tensor(row_of_token, a: torch.Tensor) -> torch.Tensor:
    """``row_of_token`` as a ``[T]`` tensor (from a length L: sequences of L tokens)."""
    if torch.is_tensor(row_of_token):
        return row_of_token
    return torch.arange(a.shape[0], device=a.device) // row_of_token


def _check_rows(row_of_token, tokens: int, rows: int) -> None:
    """A ``[T]`` int64 row index, or a length L with ``T = rows * L`` (shapes only, nothing built)."""
    if torch.is_tensor(row_of_token):
        if row_of_token.shape != (tokens,) or row_of_token.dtype != torch.int64:
            raise ValueError(f"row_of_token must be int64 [{tokens}], got {row_of_token.dtype} "
                             f"{tuple(row_of_token.shape)}")
    elif row_of_token <= 0 or rows * row_of_token != tokens:
        raise ValueError(f"{tokens} tokens are not {rows} sequences of {row_of_token} tokens")


def _check_memory(a, memory, hidden, base) -> None:
    tokens, dim = a.shape
    if memory.shape != (dim, hidden):
        raise ValueError(f"memory must be [{dim}, {hidden}], got {tuple(memory.shape)}")
    if base is not None and base.shape != (tokens, hidden):
        raise ValueError(f"base must be [{tokens}, {hidden}], got {tuple(base.shape)}")


def _check_inputs(a, weight, memory, row_of_token, bits, gate, base) -> None:
    dim = a.shape[1]
    if weight is None and base is None:
        raise ValueError("memoir_down_proj needs the base weight or a precomputed base output")
    if weight is not None and weight.shape != (weight.shape[0], dim):
        raise ValueError(f"weight must be [d, {dim}], got {tuple(weight.shape)}")
    hidden = weight.shape[0] if weight is not None else base.shape[1]
    _check_memory(a, memory, hidden, base)
    if bits.dim() != 2 or gate.shape != (bits.shape[0],) or gate.dtype != torch.bool:
        raise ValueError(f"gate must be bool [R] matching bits [R, W]; got {tuple(gate.shape)} and {tuple(bits.shape)}")
    _check_rows(row_of_token, a.shape[0], bits.shape[0])


def _check_routed_inputs(a, memory, row_of_token, bank_bits, index, overlap, base) -> None:
    if base is None:
        raise ValueError("memoir_down_proj_routed needs the base output")
    _check_memory(a, memory, base.shape[1], base)
    words = num_words(a.shape[1])
    if bank_bits.dtype != torch.int64 or bank_bits.dim() != 2 or bank_bits.shape[1] != words:
        raise ValueError(f"bank_bits must be int64 [N, {words}], got {bank_bits.dtype} {tuple(bank_bits.shape)}")
    rows = index.shape[0] if index.dim() == 1 else -1
    if index.dtype != torch.int64 or rows < 0:
        raise ValueError(f"index must be int64 [R], got {index.dtype} {tuple(index.shape)}")
    if overlap.dtype != torch.int32 or overlap.shape != (rows,):
        raise ValueError(f"overlap must be int32 [{rows}], got {overlap.dtype} {tuple(overlap.shape)}")
    _check_rows(row_of_token, a.shape[0], rows)


# --------------------------------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    # Offsets: a row index times a row stride or length is computed in int64 (`t.to(tl.int64) *
    # stride`): in int32 it wraps once T * D passes 2^31, from about 150k tokens at D = 14336. The
    # token row pointers are formed once per program and the K loop adds offsets within a row; W_m
    # and W0 rows take int64 products too (64 x 128 tiles: 0 B spilled with the products formed in
    # the loop, 376 B with an int32 tile of W_m offsets hoisted out of it).

    @triton.jit
    def _gate_and_slot(row, valid, slot_ptr, gate_ptr, min_overlap, ROUTED: tl.constexpr):
        """``(gated, slot)`` of sequence(s) ``row``, loads masked by ``valid``: whether the row uses
        the memory and which row of the bits holds its mask. Routed: slot = index[row] and gated =
        overlap[row] >= min_overlap (``gate_ptr`` holds the int32 overlaps), here rather than as
        separate launches before this one; otherwise slot = row and the bool gate[row]."""
        if ROUTED:
            slot = tl.load(slot_ptr + row, mask=valid, other=0)
            gated = tl.load(gate_ptr + row, mask=valid, other=0) >= min_overlap
        else:
            slot = row
            gated = tl.load(gate_ptr + row, mask=valid, other=0).to(tl.int1)
        return gated & valid, slot.to(tl.int64)

    @triton.jit
    def _edited(base, acc, a_ptr, out_ptr, ROUND_RESIDUAL: tl.constexpr):
        """base + residual in the output dtype; the residual rounded to the activations' dtype
        before the add when ROUND_RESIDUAL, as the reference does."""
        if ROUND_RESIDUAL:
            acc = acc.to(a_ptr.dtype.element_ty).to(tl.float32)
        return (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty)

    @triton.jit
    def _gather_residual(a_row, mem_ptr, bits_row, n, in_n, dim, hidden, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        """sum_{i in mask} a[t, i] W_m[i, n] for one token (``a_row``) and its mask's words
        (``bits_row``): masked loads read only the selected rows of W_m."""
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            in_k = kk < dim
            word = tl.load(bits_row + kk // 64, mask=in_k, other=0)
            chosen = in_k & (((word >> (kk % 64).to(tl.int64)) & 1) != 0)
            x = tl.load(a_row + kk, mask=chosen, other=0.0).to(tl.float32)
            m = tl.load(mem_ptr + kk.to(tl.int64)[:, None] * hidden + n[None, :], mask=chosen[:, None] & in_n[None, :],
                        other=0.0)
            acc += tl.sum(x[:, None] * m.to(tl.float32), axis=0)
        return acc

    @triton.jit
    def _down_proj_gather_kernel(
        a_ptr, w_ptr, mem_ptr, rows_ptr, bits_ptr, slot_ptr, gate_ptr, bias_ptr, base_ptr, out_ptr,
        per_row, min_overlap, dim, hidden, words, stride_a, stride_base, stride_out,
        ROWS_BY_DIVISION: tl.constexpr, ROUTED: tl.constexpr, HAS_BASE: tl.constexpr, IN_PLACE: tl.constexpr,
        HAS_BIAS: tl.constexpr, ROUND_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[t, n] = base[t, n] + gate[r] * sum_{i in mask[r]} a[t, i] W_m[i, n].  One token per program
        row; masked loads skip the rows of W_m outside the mask, so only the k selected rows are read.
        IN_PLACE (``out`` is ``base``): an ungated token reads and writes nothing."""
        t = tl.program_id(0)
        t64 = t.to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = n < hidden
        if ROWS_BY_DIVISION:
            row = t // per_row
        else:
            row = tl.load(rows_ptr + t)
        gated, slot = _gate_and_slot(row, t >= 0, slot_ptr, gate_ptr, min_overlap, ROUTED)  # (t always exists)
        a_row = a_ptr + t64 * stride_a
        bits_row = bits_ptr + slot * words
        out_row = out_ptr + t64 * stride_out
        if IN_PLACE:
            if gated:
                base = tl.load(out_row + n, mask=in_n, other=0.0)
                acc = _gather_residual(a_row, mem_ptr, bits_row, n, in_n, dim, hidden, BLOCK_N, BLOCK_K)
                tl.store(out_row + n, _edited(base, acc, a_ptr, out_ptr, ROUND_RESIDUAL), mask=in_n)
        else:
            if HAS_BASE:
                base = tl.load(base_ptr + t64 * stride_base + n, mask=in_n, other=0.0)
            else:
                acc_base = tl.zeros([BLOCK_N], dtype=tl.float32)
                w_cols = w_ptr + n.to(tl.int64)[None, :] * dim  # W0 row n (nn.Linear layout)
                for k0 in range(0, dim, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(a_row + kk, mask=kk < dim, other=0.0).to(tl.float32)
                    w = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < dim) & in_n[None, :], other=0.0)
                    acc_base += tl.sum(x[:, None] * w.to(tl.float32), axis=0)
                if HAS_BIAS:
                    acc_base += tl.load(bias_ptr + n, mask=in_n, other=0.0).to(tl.float32)
                base = acc_base.to(out_ptr.dtype.element_ty)
            result = base
            if gated:
                acc = _gather_residual(a_row, mem_ptr, bits_row, n, in_n, dim, hidden, BLOCK_N, BLOCK_K)
                result = _edited(base, acc, a_ptr, out_ptr, ROUND_RESIDUAL)
            tl.store(out_row + n, result, mask=in_n)

    @triton.jit
    def _dense_residual_step(acc, x, word, k0, mem_ptr, n, in_k, in_n, hidden, DOT_FP32: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        """acc += (mask ⊙ x) W_m[k0 : k0 + BLOCK_K] for a [BLOCK_T, BLOCK_K] activation tile and each
        token's mask word (0 for ungated tokens)."""
        kk = k0 + tl.arange(0, BLOCK_K)
        chosen = ((word[:, None] >> (kk % 64).to(tl.int64)[None, :]) & 1) != 0
        m = tl.load(mem_ptr + kk.to(tl.int64)[:, None] * hidden + n[None, :], mask=in_k[:, None] & in_n[None, :],
                    other=0.0)
        if DOT_FP32:
            # fp32 activations, or the interpreter (whose half-precision arithmetic is unreliable).
            acc += tl.dot(tl.where(chosen, x.to(tl.float32), 0.0), m.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.where(chosen, x, 0.0), m.to(x.dtype))
        return acc

    @triton.jit
    def _dense_base_step(acc_base, x, w_cols, kk, in_k, in_n, DOT_FP32: tl.constexpr):
        """acc_base += x W0[:, kk]^T (the base product fused into the same pass over the activations)."""
        w = tl.load(w_cols + kk[:, None], mask=in_k[:, None] & in_n[None, :], other=0.0)
        if DOT_FP32:
            acc_base += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc_base += tl.dot(x, w.to(x.dtype))
        return acc_base

    @triton.jit
    def _down_proj_dense_kernel(
        a_ptr, w_ptr, mem_ptr, rows_ptr, bits_ptr, slot_ptr, gate_ptr, bias_ptr, base_ptr, out_ptr,
        per_row, min_overlap, tokens, dim, hidden, words, stride_a, stride_base, stride_out,
        ROWS_BY_DIVISION: tl.constexpr, ROUTED: tl.constexpr, HAS_BASE: tl.constexpr, IN_PLACE: tl.constexpr,
        HAS_BIAS: tl.constexpr, ROUND_RESIDUAL: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Y = base + (G ⊙ M[rows] ⊙ A) W_m, tiled [BLOCK_T, BLOCK_N]: each W_m tile serves BLOCK_T tokens.
        BLOCK_K divides 64, so a K step lies inside one 64-bit mask word: one word per token row is
        loaded and expanded in registers (a [BLOCK_T, BLOCK_K] int64 tile of words would cost 8 bytes
        per element in shared memory and registers, and spilled).

        A tile with no gated token reads no mask word and no W_m and runs no residual product: an
        unrelated prompt's prefill costs the base output alone (the fused W0 product, or with a given
        base one copy of it; IN_PLACE, where ``out`` is ``base``, nothing at all)."""
        tl.static_assert(64 % BLOCK_K == 0)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t64 = t.to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_t, in_n = t < tokens, n < hidden
        if ROWS_BY_DIVISION:
            row = tl.where(in_t, t // per_row, 0)
        else:
            row = tl.load(rows_ptr + t, mask=in_t, other=0)
        gated, slot = _gate_and_slot(row, in_t, slot_ptr, gate_ptr, min_overlap, ROUTED)
        any_gated = tl.max(gated.to(tl.int32), axis=0) > 0
        a_rows = a_ptr + t64[:, None] * stride_a  # [BLOCK_T, 1] row starts
        bits_rows = bits_ptr + slot * words
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc_base = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        if HAS_BASE:
            if any_gated:
                for k0 in range(0, dim, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    in_k = kk < dim
                    word = tl.load(bits_rows + k0 // 64, mask=gated, other=0)  # [BLOCK_T]
                    x = tl.load(a_rows + kk[None, :], mask=gated[:, None] & in_k[None, :], other=0.0)
                    acc = _dense_residual_step(acc, x, word, k0, mem_ptr, n, in_k, in_n, hidden, DOT_FP32,
                                               BLOCK_K)
        else:
            w_cols = w_ptr + n.to(tl.int64)[None, :] * dim  # W0 row n (nn.Linear layout)
            if any_gated:
                for k0 in range(0, dim, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    in_k = kk < dim
                    word = tl.load(bits_rows + k0 // 64, mask=gated, other=0)
                    x = tl.load(a_rows + kk[None, :], mask=in_t[:, None] & in_k[None, :], other=0.0)
                    acc = _dense_residual_step(acc, x, word, k0, mem_ptr, n, in_k, in_n, hidden, DOT_FP32,
                                               BLOCK_K)
                    acc_base = _dense_base_step(acc_base, x, w_cols, kk, in_k, in_n, DOT_FP32)
            else:
                for k0 in range(0, dim, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    in_k = kk < dim
                    x = tl.load(a_rows + kk[None, :], mask=in_t[:, None] & in_k[None, :], other=0.0)
                    acc_base = _dense_base_step(acc_base, x, w_cols, kk, in_k, in_n, DOT_FP32)
        out_mask = in_t[:, None] & in_n[None, :]
        out_tile = out_ptr + t64[:, None] * stride_out + n[None, :]
        if IN_PLACE:
            # out is base: ungated rows already hold their output; only gated rows are read and written.
            if any_gated:
                edit = out_mask & gated[:, None]
                base = tl.load(out_tile, mask=edit, other=0.0)
                tl.store(out_tile, _edited(base, acc, a_ptr, out_ptr, ROUND_RESIDUAL), mask=edit)
        else:
            if HAS_BASE:
                base = tl.load(base_ptr + t64[:, None] * stride_base + n[None, :], mask=out_mask, other=0.0)
            else:
                if HAS_BIAS:
                    acc_base += tl.load(bias_ptr + n, mask=in_n, other=0.0).to(tl.float32)[None, :]
                base = acc_base.to(out_ptr.dtype.element_ty)
            result = base
            if any_gated:
                result = tl.where(gated[:, None], _edited(base, acc, a_ptr, out_ptr, ROUND_RESIDUAL), base)
            tl.store(out_tile, result, mask=out_mask)

    # Tile shapes on a GPU, tried once per (D, d) on the first call (outside any CUDA-graph capture:
    # the callers warm up first) and cached by Triton. Gather regime: one token has only d / BLOCK_N
    # programs (64 at d 4096 with BLOCK_N 64, half an H100's SMs), so narrower column blocks with
    # longer K steps keep more programs and more bytes in flight; BLOCK_N 16 still reads whole
    # 32-byte sectors of a bf16 W_m row. The interpreter runs one small fixed tile instead.
    GATHER_CONFIGS = [
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 512}, num_warps=8),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 1024}, num_warps=8),
    ]
    # Dense regime: tiles whose K step stays inside one mask word. Every config of both lists is
    # compiled for sm_90 in CI (tests/kernels/test_triton_sm90_compile.py), with a bound on spills.
    DENSE_CONFIGS = [
        triton.Config({"BLOCK_T": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        # 8 warps: at 4 the two [64, 64] fp32 accumulators (base + residual) spilled 128 B with
        # Triton 3.7 and 324 B with 3.6 (the GPU machines' version); 0 at 8 with both.
        triton.Config({"BLOCK_T": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        # K step 32: with 64 the two [128, 64] accumulators spilled 488 B under Triton 3.6 once the
        # tile-skip branch and 64-bit offsets were in (36 B with 3.7).
        triton.Config({"BLOCK_T": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ]
    # The interpreter's fixed tiles (small: the CPU interpreter's cost grows with the tile).
    INTERPRETER_GATHER_TILES = {"BLOCK_N": 32, "BLOCK_K": 32}
    INTERPRETER_DENSE_TILES = {"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    _down_proj_gather_tuned = triton.autotune(GATHER_CONFIGS, key=["dim", "hidden"])(_down_proj_gather_kernel)
    _down_proj_dense_tuned = triton.autotune(DENSE_CONFIGS, key=["dim", "hidden"])(_down_proj_dense_kernel)
    # In place, each candidate's benchmark runs would add the residual again and again: the output
    # (the given base) is restored after each.
    _down_proj_gather_tuned_in_place = triton.autotune(GATHER_CONFIGS, key=["dim", "hidden"],
                                                       restore_value=["out_ptr"])(_down_proj_gather_kernel)
    _down_proj_dense_tuned_in_place = triton.autotune(DENSE_CONFIGS, key=["dim", "hidden"],
                                                      restore_value=["out_ptr"])(_down_proj_dense_kernel)

    def _kernel_and_tiles(kernel, tuned, small: bool, interpreter_tiles: dict):
        """The kernel to launch and the tile arguments it needs: the interpreter's small fixed tile;
        the autotuner (which passes its own); or, with ``MEMOIR_TRITON_AUTOTUNE=0``, the first
        candidate without tuning (no benchmarking at the first call of each shape)."""
        if small:
            return kernel, interpreter_tiles
        if not autotune_enabled():
            first = tuned.configs[0]
            return kernel, dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
        return tuned, {}

    def _launch(a, weight, memory, row_of_token, tokens_per_row, bits, slots, gate, min_overlap, bias, base,
                in_place=False):
        """Runs the gather kernel (up to ``DECODE_MAX_TOKENS`` tokens) or the dense one. ``slots``
        ``None``: sequence r uses ``bits[r]`` and the bool ``gate[r]``; otherwise ``bits[slots[r]]``
        and the int32 ``gate[r] >= min_overlap``. ``a`` and ``base`` may have any row stride (their
        rows contiguous). Returns ``[T, d]`` in ``a``'s dtype: a new tensor, or ``base`` itself
        written in place (``in_place``: gated rows only)."""
        tokens, dim = a.shape
        hidden = memory.shape[1]
        small = interpreting()  # small tiles keep the CPU interpreter fast
        # The interpreter converts fp32 to bf16 by truncation, not rounding: there the kernel writes
        # fp32 without the intermediate rounding and torch rounds once at the end.
        emulate = small and a.dtype == torch.bfloat16
        if in_place and emulate:  # (interpreter only) the rounded result copied back, ungated rows unchanged
            return base.copy_(_launch(a, weight, memory, row_of_token, tokens_per_row, bits, slots, gate, min_overlap,
                                      bias, base))
        if in_place:
            out = base
        else:
            out = torch.empty(tokens, hidden, dtype=torch.float32 if emulate else a.dtype, device=a.device)
        dummy = a  # stands in for absent optional pointers; constexpr flags keep it unread
        args = (a, weight if weight is not None else dummy, memory, row_of_token if row_of_token is not None else dummy,
                bits, slots if slots is not None else dummy, gate, bias if bias is not None else dummy,
                base if base is not None else dummy, out, tokens_per_row, min_overlap)
        strides = (a.stride(0), base.stride(0) if base is not None else 0, out.stride(0))
        flags = {"ROWS_BY_DIVISION": row_of_token is None, "ROUTED": slots is not None, "HAS_BASE": base is not None,
                 "IN_PLACE": in_place, "HAS_BIAS": bias is not None, "ROUND_RESIDUAL": not emulate}
        words = bits.shape[1]
        if tokens <= DECODE_MAX_TOKENS:
            tuned = _down_proj_gather_tuned_in_place if in_place else _down_proj_gather_tuned
            kernel, tiles = _kernel_and_tiles(_down_proj_gather_kernel, tuned, small, INTERPRETER_GATHER_TILES)
            wrap_triton(kernel)[lambda meta: (tokens, triton.cdiv(hidden, meta["BLOCK_N"]))](
                *args, dim, hidden, words, *strides, **flags, **tiles,
            )
        else:
            tuned = _down_proj_dense_tuned_in_place if in_place else _down_proj_dense_tuned
            kernel, tiles = _kernel_and_tiles(_down_proj_dense_kernel, tuned, small, INTERPRETER_DENSE_TILES)
            grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(hidden, meta["BLOCK_N"]))  # noqa: E731
            wrap_triton(kernel)[grid](
                *args, tokens, dim, hidden, words, *strides, **flags, DOT_FP32=a.dtype == torch.float32 or small,
                **tiles,
            )
        return out.to(a.dtype) if emulate else out

    @triton_op("memoir::down_proj_triton", mutates_args=())
    def _down_proj_triton_op(
        a: torch.Tensor,
        weight: torch.Tensor | None,
        memory: torch.Tensor,
        row_of_token: torch.Tensor | None,
        tokens_per_row: int,
        bits: torch.Tensor,
        gate: torch.Tensor,
        bias: torch.Tensor | None,
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        return _launch(a, weight, memory, row_of_token, tokens_per_row, bits, None, gate, 0, bias, base)

    @_down_proj_triton_op.register_fake
    def _(a, weight, memory, row_of_token, tokens_per_row, bits, gate, bias, base):
        return a.new_empty(a.shape[0], memory.shape[1])

    @triton_op("memoir::down_proj_routed_triton", mutates_args=())
    def _down_proj_routed_triton_op(
        a: torch.Tensor,
        memory: torch.Tensor,
        row_of_token: torch.Tensor | None,
        tokens_per_row: int,
        bank_bits: torch.Tensor,
        index: torch.Tensor,
        overlap: torch.Tensor,
        min_overlap: int,
        base: torch.Tensor,
    ) -> torch.Tensor:
        return _launch(a, None, memory, row_of_token, tokens_per_row, bank_bits, index, overlap, min_overlap, None,
                       base)

    @_down_proj_routed_triton_op.register_fake
    def _(a, memory, row_of_token, tokens_per_row, bank_bits, index, overlap, min_overlap, base):
        # Explicit, rather than traced through the kernel: the interpreter cannot run on fake tensors.
        return a.new_empty(a.shape[0], memory.shape[1])

    @triton_op("memoir::down_proj_routed_triton_", mutates_args=("base",))
    def _down_proj_routed_in_place_op(
        a: torch.Tensor,
        memory: torch.Tensor,
        row_of_token: torch.Tensor | None,
        tokens_per_row: int,
        bank_bits: torch.Tensor,
        index: torch.Tensor,
        overlap: torch.Tensor,
        min_overlap: int,
        base: torch.Tensor,
    ) -> None:
        _launch(a, None, memory, row_of_token, tokens_per_row, bank_bits, index, overlap, min_overlap, None, base,
                in_place=True)

    @_down_proj_routed_in_place_op.register_fake
    def _(a, memory, row_of_token, tokens_per_row, bank_bits, index, overlap, min_overlap, base):
        return None
