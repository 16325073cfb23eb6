"""TopHash: the binary mask of a sequence, from its prompt-token activations.

key = mean_{t in window} a_t - mu;  S = top-k of |key| (larger |value| first, then lower index);
mask = {perm[i] : i in S}, packed into int64 words.
"""

from __future__ import annotations

import torch

from ._bits import num_words, pack_bits
from ._triton import HAS_TRITON
from .backend import resolve_backend

__all__ = ["prompt_keys", "tophash", "tophash_from_keys", "tophash_reference", "inverse_permutation"]


def prompt_keys(acts: torch.Tensor, window: torch.Tensor | None, mu: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``acts [B, T, D]`` over the tokens where ``window [B, T]`` is true (every token when
    ``window`` is ``None``), minus ``mu [D]``.

    Computed in fp32 whatever the input dtype. A row with an empty window gets the zero mean (its
    key is then ``-mu``) rather than NaN, so one bad row cannot poison a batch.

    Returns keys ``[B, D]`` (fp32).
    """
    _check_acts(acts, window)
    # The same weighted sum with all weights 1, so a full window and no window agree to the bit.
    weights = torch.ones(acts.shape[:2], device=acts.device) if window is None else window.to(torch.float32)
    count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    summed = torch.einsum("bt,btd->bd", weights, acts.to(torch.float32))
    keys = summed / count
    if mu is not None:
        keys = keys - mu.to(torch.float32)
    return keys


def tophash_from_keys(keys: torch.Tensor, perm: torch.Tensor, k: int) -> torch.Tensor:
    """Packed TopHash masks ``[B, W]`` of keys ``[B, D]`` (reference).

    Ties in ``|key|`` go to the lower index: a stable descending sort keeps equal values in index
    order, which is the contract every kernel must reproduce.
    """
    batch, dim = keys.shape
    if not 0 < k <= dim:
        raise ValueError(f"top_k must be in [1, {dim}], got {k}")
    if perm.shape != (dim,):
        raise ValueError(f"perm must have shape [{dim}], got {tuple(perm.shape)}")
    order = torch.sort(keys.abs(), dim=1, descending=True, stable=True).indices
    selected = perm.to(keys.device)[order[:, :k]]
    mask = torch.zeros(batch, dim, dtype=torch.bool, device=keys.device)
    mask.scatter_(1, selected, True)
    return pack_bits(mask)


def tophash_reference(
    acts: torch.Tensor, window: torch.Tensor | None, mu: torch.Tensor | None, perm: torch.Tensor, k: int
) -> torch.Tensor:
    """Pure-PyTorch TopHash of ``acts [B, T, D]`` over ``window [B, T]`` (``None``: every token);
    returns bits ``[B, W]``."""
    return tophash_from_keys(prompt_keys(acts, window, mu), perm, k)


def tophash(
    acts: torch.Tensor,
    window: torch.Tensor | None,
    mu: torch.Tensor | None,
    perm: torch.Tensor,
    k: int,
    inverse_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """TopHash masks of a batch of sequences.

    Args:
        acts: ``[B, T, D]`` token activations (any float dtype).
        window: ``[B, T]`` bool, true on the prompt tokens that enter the key (padding excluded);
            ``None``: every token (no all-true tensor to fill on the device first).
        mu: ``[D]`` background mean subtracted from the key, or ``None``.
        perm: ``[D]`` int64 permutation of ``0..D-1``.
        k: number of positions set in every mask.
        inverse_perm: optional ``[D]`` :func:`inverse_permutation` of ``perm``, so callers that
            hash often (the edited layer) compute it once; derived from ``perm`` when absent.

    Returns:
        ``[B, ceil(D / 64)]`` int64 packed masks, bit-identical across backends for the same keys.
        (The Triton kernel sums the window in its own order, so on arbitrary data its fp32 key may
        differ from the reference's in the last bit, which can swap two near-equal entries at the
        top-k boundary; with exactly representable sums the masks are identical.)

    Example:
        >>> bits = tophash(acts, attention_mask.bool(), mu, perm, k=439)
    """
    _check_acts(acts, window)
    return torch.ops.memoir.tophash(acts, window, mu, perm, k, inverse_perm)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv [D]`` with ``inv[perm[i]] = i``: the kernel fills mask position j from key index inv[j]."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device, dtype=perm.dtype)
    return inverse


def _tophash_triton(acts, window, mu, perm, k, inverse_perm):
    batch, _, dim = acts.shape
    if not 0 < k <= dim:
        raise ValueError(f"top_k must be in [1, {dim}], got {k}")
    if perm.shape != (dim,):
        raise ValueError(f"perm must have shape [{dim}], got {tuple(perm.shape)}")
    if inverse_perm is None:
        inverse_perm = inverse_permutation(perm)
    if mu is not None:
        mu = mu.to(device=acts.device, dtype=torch.float32).contiguous()
    window = None if window is None else window.contiguous()
    # Any batch and token strides (the kernel takes them): a copy only when a token's elements are not adjacent.
    if acts.shape[2] > 1 and acts.stride(2) != 1:
        acts = acts.contiguous()
    return torch.ops.memoir.tophash_triton(acts, window, mu, inverse_perm.contiguous(), k)


# ------------------------------------------------------------------------------ the registered op
# memoir::tophash: the PyTorch reference for every device, the Triton kernel where the backend
# switch says triton (GPUs; the interpreter on CPU when asked for explicitly).
@torch.library.custom_op("memoir::tophash", mutates_args=())
def _tophash_op(acts: torch.Tensor, window: torch.Tensor | None, mu: torch.Tensor | None, perm: torch.Tensor, k: int,
                inverse_perm: torch.Tensor | None) -> torch.Tensor:
    return tophash_reference(acts, window, mu, perm, k)


@_tophash_op.register_kernel(("cpu", "cuda"))
def _(acts, window, mu, perm, k, inverse_perm):
    if resolve_backend("tophash", acts.device) == "triton":
        return _tophash_triton(acts, window, mu, perm, k, inverse_perm)
    return tophash_reference(acts, window, mu, perm, k)


@_tophash_op.register_fake
def _(acts, window, mu, perm, k, inverse_perm):
    return acts.new_empty(acts.shape[0], num_words(acts.shape[2]), dtype=torch.int64)


def _check_acts(acts: torch.Tensor, window: torch.Tensor | None) -> None:
    if acts.dim() != 3:
        raise ValueError(f"acts must be [B, T, D], got shape {tuple(acts.shape)}")
    if window is None:
        return
    if window.shape != acts.shape[:2]:
        raise ValueError(f"window must be [B, T] = {tuple(acts.shape[:2])}, got {tuple(window.shape)}")
    if window.dtype != torch.bool:
        raise TypeError(f"window must be bool, got {window.dtype}")


# --------------------------------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def kth_largest_bits(mag, k):
        """The k-th largest entry of ``mag`` (int32 bit patterns of non-negative floats, which order
        like the floats; entries < 0 are absent). Radix select from the top byte down: four
        256-bin histograms of the entries that still match the chosen prefix, instead of one
        block-wide count per bit (31 reductions, each a round of barriers on the GPU). Used by the
        TopHash kernel (one program per sequence, 8 warps); the fused editing kernel keeps the
        bit loop, where the histograms spilled 6 KB of registers at 4 warps."""
        bins = tl.arange(0, 256)
        prefix = tl.full([], 0, tl.int32)  # the bytes chosen so far ...
        fixed = tl.full([], 0, tl.int32)  # ... and which bits they cover
        remaining = k  # how many of the matching entries are still to be taken, largest first
        for step in tl.static_range(4):
            shift = 24 - 8 * step
            match = (mag >= 0) & ((mag & fixed) == prefix)
            # Entries that do not match are counted in bin 0 and taken out again (histogram's mask
            # argument is not relied on: the GPU machines run another Triton release than CI).
            hist = tl.histogram(tl.where(match, (mag >> shift) & 255, 0), 256)
            hist -= tl.where(bins == 0, tl.sum((~match).to(tl.int32), axis=0), 0)
            at_least = tl.cumsum(hist, axis=0, reverse=True)  # at_least[b]: matches with byte >= b
            byte = tl.max(tl.where(at_least >= remaining, bins, 0), axis=0)
            remaining -= tl.sum(tl.where(bins == byte, at_least - hist, 0), axis=0)  # those above byte
            prefix = prefix | (byte << shift)
            fixed = fixed | (tl.full([], 255, tl.int32) << shift)
        return prefix

    @triton.jit
    def _window_sum(token, window_row, first, last, acts_token_stride, in_dim, HAS_WINDOW: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """(sum_t w_t a_t, sum_t w_t) over tokens first..last-1 of one sequence, in token order;
        ``token`` points at token ``first``'s columns and is advanced by the token stride (a 64-bit
        pointer add, no product to wrap; formed from t * stride in the loop, the int64 product
        spilled 556 B at BLOCK_D 16384)."""
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        count = tl.zeros([1], dtype=tl.float32)
        for t in range(first, last):
            # Window weights multiply (not skip) the token, as the reference's einsum does; no
            # window is weight 1 everywhere, the same arithmetic as an all-true window.
            if HAS_WINDOW:
                weight = tl.load(window_row + t + tl.arange(0, 1)).to(tl.float32)
            else:
                weight = tl.full([1], 1.0, tl.float32)
            x = tl.load(token, mask=in_dim, other=0.0)
            token += acts_token_stride
            # Loaded then converted at once: half types are only storage, the arithmetic is fp32.
            acc += x.to(tl.float32) * weight
            count += weight
        return acc, count

    @triton.jit
    def _tophash_partial_kernel(
        acts_ptr, acts_batch_stride, acts_token_stride, window_ptr, partial_ptr, count_ptr,
        tokens, dim, chunk,
        HAS_WINDOW: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """First step of a long prompt's key: program (b, c, j) sums tokens [c * chunk, (c + 1) *
        chunk) of sequence b over columns [j * BLOCK_D, (j + 1) * BLOCK_D) into
        partial[b, c, columns] (and the window weights into count[b, c])."""
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        chunks = tl.num_programs(1)
        offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_dim = offs < dim
        first = part * chunk
        last = tl.minimum(first + chunk, tokens)
        token = acts_ptr + row * acts_batch_stride + first.to(tl.int64) * acts_token_stride + offs
        acc, count = _window_sum(token, window_ptr + row * tokens, first, last, acts_token_stride, in_dim,
                                 HAS_WINDOW, BLOCK_D)
        slot = row * chunks + part
        tl.store(partial_ptr + slot * dim + offs, acc, mask=in_dim)
        if tl.program_id(2) == 0:
            tl.store(count_ptr + slot + tl.arange(0, 1), count)

    @triton.jit
    def _tophash_kernel(
        acts_ptr, acts_batch_stride, acts_token_stride,
        window_ptr, mu_ptr, inv_perm_ptr, scratch_ptr, out_ptr, partial_ptr, count_ptr,
        tokens, dim, words, k, chunks,
        HAS_WINDOW: tl.constexpr, HAS_MU: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_WORDS: tl.constexpr,
    ):
        """key = sum_t w_t a_t / max(sum_t w_t, 1) - mu;  S = top-k |key| (ties: lower index);
        bits[j // 64] |= [inv_perm[j] in S] << (j % 64).  One program per sequence: it sums the
        tokens itself, or (SPLIT) the ``chunks`` partial sums of :func:`_tophash_partial_kernel`
        in chunk order.

        Offsets that multiply a sequence or token index by a stride or a length are int64: in int32
        ``row * acts_batch_stride`` wraps once a batch holds 2^31 elements (150k tokens at D 14336)."""
        row = tl.program_id(0).to(tl.int64)
        # D and its word count fit in int32 (the key is a register row of BLOCK_D >= D): with them
        # as int64 (i64 arguments) the column arithmetic spilled 504 B at BLOCK_D 16384, 0 B so.
        dim = dim.to(tl.int32)
        words = words.to(tl.int32)
        offs = tl.arange(0, BLOCK_D)
        in_dim = offs < dim
        if SPLIT:
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            count = tl.zeros([1], dtype=tl.float32)
            partial = partial_ptr + row * chunks * dim + offs
            for part in range(chunks):  # a fixed order: the same key bit for bit on every run
                acc += tl.load(partial, mask=in_dim, other=0.0)
                partial += dim
                count += tl.load(count_ptr + row * chunks + part + tl.arange(0, 1))
        else:
            acc, count = _window_sum(acts_ptr + row * acts_batch_stride + offs, window_ptr + row * tokens, 0, tokens,
                                     acts_token_stride, in_dim, HAS_WINDOW, BLOCK_D)
        key = acc / tl.maximum(count, 1.0)
        if HAS_MU:
            key = key - tl.load(mu_ptr + offs, mask=in_dim, other=0.0)
        # |key| as int32 bits orders like the float (non-negative floats are monotonic in their
        # bits), so the k-th largest value is a radix select on integers, no sort.
        mag = tl.where(in_dim, tl.abs(key).to(tl.int32, bitcast=True), -1)
        threshold = kth_largest_bits(mag, k)
        # Everything above the threshold is in; of the entries equal to it, the lowest indices up
        # to k in total. `cut`: entries equal to the threshold with index < cut are selected.
        need = k - tl.sum((mag > threshold).to(tl.int32), axis=0)
        equal = mag == threshold
        rank = tl.cumsum(equal.to(tl.int32), axis=0)
        cut = tl.min(tl.where(equal & (rank == need), offs, BLOCK_D), axis=0) + 1
        # Mask position j holds key index inv_perm[j]: gather through a per-row scratch copy (a
        # register row cannot be indexed), then pack 64 positions per word with disjoint shifts.
        tl.store(scratch_ptr + row * dim + offs, mag, mask=in_dim)
        tl.debug_barrier()
        bit = tl.arange(0, 64)
        for w0 in range(0, words, BLOCK_WORDS):
            word = w0 + tl.arange(0, BLOCK_WORDS)
            position = word[:, None] * 64 + bit[None, :]
            valid = position < dim
            source = tl.load(inv_perm_ptr + position, mask=valid, other=0)
            value = tl.load(scratch_ptr + row * dim + source, mask=valid, other=-1)
            chosen = valid & ((value > threshold) | ((value == threshold) & (source < cut)))
            packed = tl.sum(chosen.to(tl.int64) << bit[None, :].to(tl.int64), axis=1)
            tl.store(out_ptr + row * words + word, packed, mask=word < words)

    # A prompt longer than MIN_TOKENS_PER_PROGRAM tokens is summed by several programs per sequence
    # (a 4096-token prefill at batch 1 ran on one SM): chunks of tokens_per_program(T) tokens times
    # blocks of PARTIAL_BLOCK_D columns, then one program per sequence adds the chunks' partial sums
    # in chunk order and selects. The chunking depends on T alone (not on the device), so a given
    # prompt gets the same key, bit for bit, on every run and every GPU; its summation order (and
    # so the key's last bit) differs from the unsplit kernel's and the reference's, as the
    # reference's own (a BLAS reduction) differs from a token loop.
    MIN_TOKENS_PER_PROGRAM = 32
    MAX_CHUNKS = 64  # at most this many partial sums per sequence: their round trip stays <= ~6%
    PARTIAL_BLOCK_D = 1024

    def tokens_per_program(tokens: int) -> int:
        """Tokens summed by one partial-sum program: at least MIN_TOKENS_PER_PROGRAM, a power of
        two, and at most MAX_CHUNKS chunks per sequence."""
        return max(MIN_TOKENS_PER_PROGRAM, triton.next_power_of_2(triton.cdiv(tokens, MAX_CHUNKS)))

    @triton_op("memoir::tophash_triton", mutates_args=())
    def _tophash_triton_op(
        acts: torch.Tensor, window: torch.Tensor | None, mu: torch.Tensor | None, inverse_perm: torch.Tensor, k: int
    ) -> torch.Tensor:
        batch, tokens, dim = acts.shape
        words = num_words(dim)
        out = torch.empty(batch, words, dtype=torch.int64, device=acts.device)
        scratch = torch.empty(batch, dim, dtype=torch.int32, device=acts.device)
        window_arg = window if window is not None else acts
        chunk = tokens_per_program(tokens)
        chunks = triton.cdiv(tokens, chunk)
        split = chunks > 1
        if split:
            partial = torch.empty(batch, chunks, dim, dtype=torch.float32, device=acts.device)
            count = torch.empty(batch, chunks, dtype=torch.float32, device=acts.device)
            block = min(PARTIAL_BLOCK_D, triton.next_power_of_2(dim))
            wrap_triton(_tophash_partial_kernel)[(batch, chunks, triton.cdiv(dim, block))](
                acts, acts.stride(0), acts.stride(1), window_arg, partial, count, tokens, dim, chunk,
                HAS_WINDOW=window is not None, BLOCK_D=block, num_warps=4,
            )
        else:
            partial = count = scratch  # unread: SPLIT is off
        block_d = triton.next_power_of_2(dim)
        wrap_triton(_tophash_kernel)[(batch,)](
            acts, acts.stride(0), acts.stride(1), window_arg, mu if mu is not None else acts,
            inverse_perm, scratch, out, partial, count, tokens, dim, words, k, chunks,
            HAS_WINDOW=window is not None, HAS_MU=mu is not None, SPLIT=split, BLOCK_D=block_d,
            BLOCK_WORDS=min(16, triton.next_power_of_2(words)), num_warps=8 if block_d >= 4096 else 4,
        )
        return out

    @_tophash_triton_op.register_fake
    def _(acts, window, mu, inverse_perm, k):
        # Explicit, rather than traced through the kernel: the interpreter cannot run on fake tensors.
        return acts.new_empty(acts.shape[0], num_words(acts.shape[2]), dtype=torch.int64)
