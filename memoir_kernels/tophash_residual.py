"""Fused TopHash + masked residual: the editing forward's residual in one launch.

While an edit is trained every row uses the TopHash mask of the edit prompt, so

    residual[t] = (m ⊙ a_t) @ W_m,   m = {perm[i] : i in top-k |key|}  (ties: lower index)

needs no per-row routing. The kernel selects the top-k of ``key``, maps it through the permutation
and multiplies the masked activations by W_m without writing the mask to memory in between. The
result equals :func:`memoir_kernels.tophash_from_keys` + :func:`memoir_kernels.masked_residual`.
"""

from __future__ import annotations

import torch

from ._bits import unpack_bits
from ._triton import HAS_TRITON, interpreting
from .backend import resolve_backend
from .down_proj import masked_residual
from .tophash import inverse_permutation, tophash_from_keys

__all__ = ["tophash_residual", "tophash_residual_reference"]


def tophash_residual_reference(
    key: torch.Tensor, perm: torch.Tensor, k: int, acts: torch.Tensor, memory: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch fused form; same contract as :func:`tophash_residual`."""
    _check(key, perm, acts, memory)
    mask = unpack_bits(tophash_from_keys(key.reshape(1, -1), perm, k), key.numel())
    return masked_residual(acts, memory, mask.expand(acts.shape[0], -1))


def tophash_residual(
    key: torch.Tensor,
    perm: torch.Tensor,
    k: int,
    acts: torch.Tensor,
    memory: torch.Tensor,
    inverse_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual of the editing forward, with the edit's TopHash mask computed inside the product.

    Args:
        key: ``[D]`` (or ``[1, D]``) fp32 key of the edit prompt (:func:`prompt_keys` of row 0).
        perm: ``[D]`` int64 permutation; ``inverse_perm`` optionally its inverse, precomputed.
        k: number of selected positions.
        acts: ``[T, D]`` activations of every token of every training row.
        memory: ``[D, d]`` residual memory W_m.

    Returns:
        ``[T, d]`` residual ``(m ⊙ a_t) @ W_m`` in ``acts``'s dtype (computed in the memory's).
        Differentiable in ``acts`` and ``memory`` (the backward is the PyTorch formula).

    Example:
        >>> hidden = base_out + tophash_residual(key, layer.permutation, layer.top_k, acts, layer.memory)
    """
    _check(key, perm, acts, memory)
    return torch.ops.memoir.tophash_residual(key.reshape(-1), perm, k, acts, memory, inverse_perm)


# ------------------------------------------------------------------------------ the registered op
# memoir::tophash_residual: the PyTorch reference for every device, the Triton kernel where the
# backend switch says triton; one backward for both (the mask again from the key, then the two
# products of a masked matmul), so W_m trains the same way on either.
@torch.library.custom_op("memoir::tophash_residual", mutates_args=())
def _tophash_residual_op(key: torch.Tensor, perm: torch.Tensor, k: int, acts: torch.Tensor, memory: torch.Tensor,
                         inverse_perm: torch.Tensor | None) -> torch.Tensor:
    return tophash_residual_reference(key, perm, k, acts, memory)


@_tophash_residual_op.register_kernel(("cpu", "cuda"))
def _(key, perm, k, acts, memory, inverse_perm):
    if resolve_backend("tophash_residual", acts.device) != "triton":
        return tophash_residual_reference(key, perm, k, acts, memory)
    if inverse_perm is None:
        inverse_perm = inverse_permutation(perm)
    if acts.shape[1] > 1 and acts.stride(1) != 1:  # any row stride is read as it is
        acts = acts.contiguous()
    return torch.ops.memoir.tophash_residual_triton(key.to(torch.float32).contiguous(), inverse_perm.contiguous(),
                                                    perm.contiguous(), k, acts, memory.contiguous())


@_tophash_residual_op.register_fake
def _(key, perm, k, acts, memory, inverse_perm):
    return acts.new_empty(acts.shape[0], memory.shape[1])


def _setup_context(ctx, inputs, output):
    key, perm, k, acts, memory, _ = inputs
    ctx.save_for_backward(key, perm, acts, memory)
    ctx.k = k


def _backward(ctx, grad):
    # The mask again from the key (cheap, PyTorch), then the two products of a masked matmul.
    key, perm, acts, memory = ctx.saved_tensors
    mask = unpack_bits(tophash_from_keys(key.reshape(1, -1), perm, ctx.k), key.numel())[0].to(memory.dtype)
    grad = grad.to(memory.dtype)
    grad_acts = ((grad @ memory.T) * mask).to(acts.dtype)
    grad_memory = (acts.to(memory.dtype) * mask).T @ grad
    return None, None, None, grad_acts, grad_memory, None


_tophash_residual_op.register_autograd(_backward, setup_context=_setup_context)


def _check(key, perm, acts, memory) -> None:
    dim = key.numel()
    if perm.shape != (dim,):
        raise ValueError(f"perm must have shape [{dim}], got {tuple(perm.shape)}")
    if acts.dim() != 2 or acts.shape[1] != dim:
        raise ValueError(f"acts must be [T, {dim}], got {tuple(acts.shape)}")
    if memory.dim() != 2 or memory.shape[0] != dim:
        raise ValueError(f"memory must be [{dim}, d], got {tuple(memory.shape)}")


# --------------------------------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _tophash_residual_kernel(
        key_ptr, inv_perm_ptr, a_ptr, mem_ptr, out_ptr,
        tokens, dim, hidden, k, stride_a,
        DOT_FP32: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[t, n] = sum_j [inv_perm[j] in top-k |key|] a[t, j] W_m[j, n].  Every program finds the
        threshold itself (the key row is small and cached), so no mask ever goes through memory.
        Row offsets are int64 (``t * stride_a`` wraps in int32 past 2^31 elements), W_m's too."""
        offs = tl.arange(0, BLOCK_D)
        key = tl.load(key_ptr + offs, mask=offs < dim, other=0.0)
        mag = tl.where(offs < dim, tl.abs(key).to(tl.int32, bitcast=True), -1)
        threshold = tl.full([], 0, tl.int32)  # a tensor from the start: loop-carried types must not change
        for i in range(31):  # the k-th largest |key| bit by bit, as in the TopHash kernel
            candidate = threshold | (1 << (30 - i))
            threshold = tl.where(tl.sum((mag >= candidate).to(tl.int32), axis=0) >= k, candidate, threshold)
        need = k - tl.sum((mag > threshold).to(tl.int32), axis=0)
        equal = mag == threshold
        rank = tl.cumsum(equal.to(tl.int32), axis=0)
        cut = tl.min(tl.where(equal & (rank == need), offs, BLOCK_D), axis=0) + 1

        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_t, in_n = t < tokens, n < hidden
        t64 = t.to(tl.int64)
        a_rows = a_ptr + t64[:, None] * stride_a
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            in_k = j < dim
            source = tl.load(inv_perm_ptr + j, mask=in_k, other=0)
            value = tl.abs(tl.load(key_ptr + source, mask=in_k, other=0.0)).to(tl.int32, bitcast=True)
            chosen = in_k & ((value > threshold) | ((value == threshold) & (source < cut)))
            x = tl.load(a_rows + j[None, :], mask=in_t[:, None] & chosen[None, :], other=0.0)
            m = tl.load(mem_ptr + j.to(tl.int64)[:, None] * hidden + n[None, :], mask=chosen[:, None] & in_n[None, :],
                        other=0.0)
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), m.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x.to(m.dtype), m)
        tl.store(out_ptr + t64[:, None] * hidden + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=in_t[:, None] & in_n[None, :])

    @triton_op("memoir::tophash_residual_triton", mutates_args=())
    def _tophash_residual_triton_op(
        key: torch.Tensor, inverse_perm: torch.Tensor, perm: torch.Tensor, k: int, acts: torch.Tensor,
        memory: torch.Tensor,
    ) -> torch.Tensor:
        tokens, dim = acts.shape
        hidden = memory.shape[1]
        small = interpreting()
        # fp32 out where the interpreter would truncate to bf16; torch rounds once below.
        emulate = small and acts.dtype == torch.bfloat16
        out = torch.empty(tokens, hidden, dtype=torch.float32 if emulate else acts.dtype, device=acts.device)
        block_t, block_n, block_k = (16, 32, 32) if small else (32, 64, 64)
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_n))
        wrap_triton(_tophash_residual_kernel)[grid](
            key, inverse_perm, acts, memory, out, tokens, dim, hidden, k, acts.stride(0),
            DOT_FP32=memory.dtype == torch.float32 or small, BLOCK_D=triton.next_power_of_2(dim),
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        )
        return out.to(acts.dtype) if emulate else out

    @_tophash_residual_triton_op.register_fake
    def _(key, inverse_perm, perm, k, acts, memory):
        return acts.new_empty(acts.shape[0], memory.shape[1])
