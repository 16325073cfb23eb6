"""MemoirLayer: the wrapper that replaces the edited MLP output projection.

It keeps the original module as ``base_layer`` (its output is always computed by that module, so
an ungated sequence is the original model bit for bit) and adds the residual memory

    y_t = base(a_t) + g * W_m^T (m ⊙ a_t)

with W_m stored ``[D, d]`` (a selected column is one contiguous row).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from memoir_kernels import (
    inverse_permutation,
    mask_search,
    masked_residual,
    memoir_down_proj_routed,
    num_words,
    prompt_keys,
    resolve_backend,
    tophash,
    tophash_from_keys,
    tophash_residual,
    unpack_bits,
)

__all__ = ["MemoirLayer", "RouteDecision", "CallContext", "TrainingPass", "Capture", "layer_dims"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class StopForward(Exception):
    """Raised by the layer while collecting keys: nothing above the edited layer is needed."""


@dataclass
class RouteDecision:
    """Per-sequence routing: the nearest stored mask and its overlap, as the mask search returns them.

    The gate and the mask itself are derived on demand (``gate``, ``bits``): the routed forward
    never builds them, its down projection reads ``index`` and ``overlap`` in the kernel.
    """

    index: torch.Tensor  # [B] int64 row of bank_bits
    overlap: torch.Tensor  # [B] int32, common active positions with that stored mask
    min_overlap: int  # the gate: overlap >= min_overlap, i.e. overlap / k >= tau
    bank_bits: torch.Tensor  # [N, W] int64, the bank searched (N >= 1)

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    @property
    def gate(self) -> torch.Tensor:
        """``[B]`` bool, overlap / k >= tau (computed on each access: one small launch)."""
        return self.overlap >= self.min_overlap

    @property
    def bits(self) -> torch.Tensor:
        """``[B, W]`` int64, the stored mask each row uses (gathered on each access)."""
        return self.bank_bits[self.index]


@dataclass
class CallContext:
    """What the current forward call tells the layer: prompt window or a decision to reuse."""

    window: torch.Tensor | None = None  # [B, T] bool prompt tokens of this input
    reuse: RouteDecision | None = None  # decision of an earlier call of the same sequences
    decision: RouteDecision | None = None  # filled by the layer when it decides


class TrainingPass:
    """What one edit's training forward needs (see :meth:`MemoirLayer.training_pass`).

    ``bits`` ``[1, W]``: the edit's mask, the TopHash of row 0's prompt tokens, set on the first
    forward (the activations entering the layer do not depend on the memory, so it never changes
    during the edit); ``rehearsal_bits`` ``[R, W]``: the stored masks of the batch's last R rows
    (rehearsed edits), or ``None``.
    """

    def __init__(self, rehearsal_bits: torch.Tensor | None = None) -> None:
        self.bits: torch.Tensor | None = None
        self.rehearsal_bits = rehearsal_bits
        # With the fused kernel (a GPU backend): the edit's key [D] fp32, from which the kernel
        # selects the mask inside the product; None on the PyTorch path.
        self.key: torch.Tensor | None = None
        self._masks: tuple[int, torch.Tensor] | None = None

    @property
    def rehearsed_rows(self) -> int:
        return 0 if self.rehearsal_bits is None else self.rehearsal_bits.shape[0]

    def masks(self, rows: int, dim: int) -> torch.Tensor:
        """Unpacked masks of a batch of ``rows`` rows: ``[1, D]`` (one mask for every row) or, with
        rehearsed rows at the end of the batch, ``[rows, D]`` (each of those its stored mask)."""
        if self._masks is None or self._masks[0] != rows:
            own = unpack_bits(self.bits, dim)
            if self.rehearsal_bits is not None:
                own = torch.cat([own.expand(rows - self.rehearsed_rows, -1), unpack_bits(self.rehearsal_bits, dim)])
            self._masks = (rows, own)
        return self._masks[1]


class Capture:
    """The edited layer's input ``[B, T, D]`` recorded by a forward under :meth:`MemoirLayer.capturing`."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None


_OFF = "off"  # the activity of a layer inside MemoirLayer.disabled()


def layer_dims(module: nn.Module) -> tuple[int, int, bool]:
    """``(D, d, transposed)`` of a Linear (weight [d, D]) or GPT-2 Conv1D (weight [D, d])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return weight.shape[0], weight.shape[1], True
    raise TypeError(f"MEMOIR edits a Linear or Conv1D layer, not {type(module).__name__}")


class MemoirLayer(nn.Module):
    """Wraps the edited projection and holds the memory's state.

    State: ``base_layer`` (the original module), ``memory`` (W_m ``[D, d]``), ``permutation``
    (``[D]``), the mask bank (``bank_bits`` ``[N, W]``, ``num_masks``), ``row_active`` (``[N]``
    bool or ``None``), mu (``background_mean`` ``[D]``, ``has_background``) and the routing
    settings ``top_k``, ``irr_threshold`` (tau: the one place it is stored) and
    ``key_aggregation``. Per forward call, per thread: ``call`` (what the call tells the layer;
    the layer writes its decision there, and the editor's routing state keeps it).

    A forward routes each sequence (inference) unless one of the context managers, which always
    restore what was there before, says otherwise: :meth:`disabled` (the original layer),
    :meth:`capturing` (record the input, return the original output), :meth:`collecting` (record
    prompt keys, then stop the forward) and :meth:`training_pass` (one edit's training forward).
    """

    def __init__(self, base_layer: nn.Module, top_k: int, irr_threshold: float, key_aggregation: str,
                 seed: int, memory_dtype: str = "float32") -> None:
        super().__init__()
        dim, hidden, transposed = layer_dims(base_layer)
        if not 0 < top_k <= dim:
            raise ValueError(f"top_k must be in [1, {dim}] for this layer, got {top_k}")
        weight = base_layer.weight
        self.base_layer = base_layer
        self.in_features, self.out_features, self.transposed = dim, hidden, transposed
        self.top_k, self.irr_threshold, self.key_aggregation = top_k, float(irr_threshold), key_aggregation
        generator = torch.Generator().manual_seed(seed)
        self.memory = nn.Parameter(
            torch.zeros(dim, hidden, dtype=_DTYPES[memory_dtype], device=weight.device), requires_grad=False
        )
        self.register_buffer("permutation", torch.randperm(dim, generator=generator).to(weight.device), persistent=False)
        # The bank grows in place: rows [0, N) of a storage whose capacity doubles when full, so an
        # edit appends one row instead of copying the whole bank (bank_bits is a view of it).
        self.register_buffer("_bank_storage", torch.zeros(0, num_words(dim), dtype=torch.int64, device=weight.device),
                             persistent=False)
        self._bank_rows = 0
        self._digests: dict[int, list[int]] | None = None  # add_mask's duplicate index (hash -> rows)
        self.register_buffer("background_mean", torch.zeros(dim, device=weight.device), persistent=False)
        self.has_background = False
        # None: route (inference). Otherwise what the innermost context manager set: _OFF, a
        # Capture, a list collecting keys, or a TrainingPass.
        self._activity: object | None = None
        # Per-call state lives per thread: concurrent forward calls never see each other's
        # prompt windows or decisions (a threading.local, which torch.compile can trace).
        self._per_thread = threading.local()
        # [N] bool, False for a withdrawn bank row (the editor keeps it in step with the registry);
        # None when every row routes, so the routed forward pays nothing for it.
        self.row_active: torch.Tensor | None = None
        self._inverse: tuple[tuple, torch.Tensor] | None = None  # (permutation's identity, its inverse)

    # ------------------------------------------------------------------------- state dict
    # The model's own checkpoint format is kept while a memory is attached: ``state_dict`` shows the
    # wrapped module's keys under their original names (``...down_proj.weight``, not
    # ``...down_proj.base_layer.weight``) and leaves the memory out, so ``model.save_pretrained``
    # writes the original model; the memory is saved with ``editor.save``. Loading accepts the
    # original names too.
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args:  # the deprecated positional form: (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (list(args) + [destination, prefix, keep_vars][len(args):])[:3]
        return self.base_layer.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
            name = key[len(prefix):]
            if name == "memory":  # never loaded from a model checkpoint: memories load with memoir.load
                state_dict.pop(key)
            else:
                state_dict[f"{prefix}base_layer.{name}"] = state_dict.pop(key)

    @property
    def call(self) -> CallContext | None:
        """What the current forward call (in this thread) tells the layer: prompt window or reuse."""
        return getattr(self._per_thread, "call", None)

    @call.setter
    def call(self, value: CallContext | None) -> None:
        self._per_thread.call = value

    @property
    def num_masks(self) -> int:
        """Rows in the mask bank."""
        return self._bank_rows

    @property
    def bank_bits(self) -> torch.Tensor:
        """``[N, W]`` int64, the stored masks (a view of the bank's storage, no copy).

        Rows never change once stored; an edit appends one. A decision (or a CUDA graph) made
        before an edit keeps searching the rows that existed then, and reads W_m as it is when it
        runs. When the bank outgrows its capacity the storage is reallocated: a CUDA graph captured
        before that reads the old storage's address, so recapture graphs after edits.
        """
        return self._bank_storage[: self._bank_rows]

    @bank_bits.setter
    def bank_bits(self, bits: torch.Tensor) -> None:
        self._bank_storage = bits.to(device=self._bank_storage.device, dtype=torch.int64).contiguous().clone()
        self._bank_rows = bits.shape[0]
        self._digests = None

    def extra_repr(self) -> str:
        return f"D={self.in_features}, d={self.out_features}, top_k={self.top_k}, tau={self.irr_threshold}, masks={self.num_masks}"

    # ----------------------------------------------------------------------------------- forward
    # ------------------------------------------------------------------------------ activities
    @property
    def routing(self) -> bool:
        """True when a forward routes (no context manager of this layer is active)."""
        return self._activity is None

    @contextlib.contextmanager
    def _active(self, activity):
        previous, self._activity = self._activity, activity
        try:
            yield activity
        finally:
            self._activity = previous

    def disabled(self):
        """Context manager: within it the layer is the original module (the memory is off)."""
        return self._active(_OFF)

    def capturing(self):
        """Context manager yielding a :class:`Capture`: a forward records the layer's input in it and
        returns the original output."""
        return self._active(Capture())

    def collecting(self):
        """Context manager yielding a list: each forward appends its prompt keys ``[B, D]`` (without
        mu) and stops with :class:`StopForward` (nothing above this layer is needed)."""
        return self._active([])

    @contextlib.contextmanager
    def training_pass(self, window: torch.Tensor, rehearsal_bits: torch.Tensor | None = None):
        """Context manager yielding a :class:`TrainingPass`: a forward adds the residual with the
        edit's mask (from row 0's prompt tokens, ``window [B, T]`` bool) to every token, or for the
        last ``R`` rows with ``rehearsal_bits [R, W]``; this thread's call context is restored."""
        previous_call, self.call = self.call, CallContext(window=window)
        try:
            with self._active(TrainingPass(rehearsal_bits)) as session:
                yield session
        finally:
            self.call = previous_call

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        activity = self._activity
        if activity is _OFF:
            return out
        acts = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        if isinstance(activity, Capture):
            activity.input = acts.detach()
            return out
        if isinstance(activity, list):
            activity.append(prompt_keys(acts, self._window(acts), None))
            raise StopForward
        if isinstance(activity, TrainingPass):
            return out + self.training_residual(activity, acts).view_as(out)
        if self.num_masks == 0:  # a shape, not a device value: no host sync
            return out
        decision = self._decide(acts)
        if self.memory.requires_grad and torch.is_grad_enabled():
            # Differentiable path (the kernels have no backward): same formula with autograd ops.
            masks = unpack_bits(decision.bits, self.in_features).unsqueeze(1)
            residual = masked_residual(acts, self.memory, masks).view_as(out)
            gate = decision.gate.view(-1, *([1] * (out.dim() - 1))) if x.dim() == 3 else decision.gate
            # where() rather than out + gate * residual: an ungated row stays exactly the base output.
            return torch.where(gate, out + residual, out)
        # The edited layer's routed forward: tophash + mask_search (in _decide, skipped when a
        # decision is reused) and one down projection that gathers each row's stored mask, compares
        # its overlap with the threshold and adds the residual to the base output of gated rows
        # (ungated rows are the original output bit for bit). Three launches on top of the original
        # module, none reading a device value back. On a GPU the sum is written into the base
        # output itself, so an ungated row is neither read nor copied; not where autograd may have
        # kept that output, and not on CPU, where the reference would add a copy instead.
        in_place = out.is_cuda and not out.requires_grad
        edited = memoir_down_proj_routed(
            acts.reshape(-1, self.in_features), self.memory, acts.shape[1], decision.bank_bits, decision.index,
            decision.overlap, decision.min_overlap, base=out.reshape(-1, self.out_features), in_place=in_place,
        )
        return edited.view_as(out)

    # ----------------------------------------------------------------------------------- helpers
    def training_residual(self, session: TrainingPass, acts: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` residual of a training forward on ``acts [B, T, D]``, differentiable in W_m.

        Where the fused kernel runs (the Triton backend: GPUs), the edit's own rows take it, the
        mask selected from the edit's key inside the product; the rehearsed rows (stored masks)
        and the CPU path take the PyTorch masked product.
        """
        if session.bits is None:
            self._begin_training(session, acts)
        if session.key is None:
            masks = session.masks(acts.shape[0], self.in_features).unsqueeze(1)
            return masked_residual(acts, self.memory, masks)
        rows, tokens = acts.shape[:2]
        own = rows - session.rehearsed_rows
        head = tophash_residual(session.key, self.permutation, self.top_k, acts[:own].reshape(-1, self.in_features),
                                self.memory, inverse_perm=self._inverse_permutation()).view(own, tokens, -1)
        if not session.rehearsed_rows:
            return head
        stored = session.masks(rows, self.in_features)[own:].unsqueeze(1)  # unpacked once per edit
        return torch.cat([head, masked_residual(acts[own:], self.memory, stored)])

    def _begin_training(self, session: TrainingPass, acts: torch.Tensor) -> None:
        # The edit's mask comes from row 0's prompt tokens on the first forward; the activations
        # entering this layer do not depend on the memory, so it never changes during the edit.
        if resolve_backend("tophash_residual", acts.device) != "triton":
            session.bits = self.edit_mask(acts)
            return
        # The stored mask and the fused kernel's selection come from the same key with the same
        # tie rule, so what is trained is exactly what is stored.
        window = self._window(acts)
        session.key = prompt_keys(acts[:1], None if window is None else window[:1], self._mu())[0]
        session.bits = self.mask_from_key(session.key[None])

    def _window(self, acts: torch.Tensor) -> torch.Tensor | None:
        """``[B, T]`` bool tokens that enter the key, or ``None`` for every token (the ops take
        that without a tensor, which spares the routed forward a fill launch)."""
        window = self.call.window if self.call is not None else None
        if window is not None and window.shape != acts.shape[:2]:
            window = None
        if self.key_aggregation != "last":
            return window
        if window is None:
            window = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
        return window & (window.cumsum(dim=1) == window.sum(dim=1, keepdim=True))

    def _mu(self) -> torch.Tensor | None:
        return self.background_mean if self.key_aggregation == "mean_decentered" and self.has_background else None

    def query_bits(self, acts: torch.Tensor, window: torch.Tensor | None) -> torch.Tensor:
        """TopHash masks ``[B, W]`` of ``acts [B, T, D]`` over ``window [B, T]`` (already aggregated;
        ``None``: every token)."""
        return tophash(acts, window, self._mu(), self.permutation, self.top_k, inverse_perm=self._inverse_permutation())

    def _inverse_permutation(self) -> torch.Tensor | None:
        # Cached for the TopHash kernel, keyed on the permutation's identity and version so that a
        # permutation replaced or copied into (loading a memory) is noticed. Not under torch.compile,
        # which must not trace the cache: the op derives the inverse itself there.
        if torch.compiler.is_compiling():
            return None
        perm = self.permutation
        key = (perm.data_ptr(), perm._version, perm.device, perm.shape)
        if self._inverse is None or self._inverse[0] != key:
            self._inverse = (key, inverse_permutation(perm))
        return self._inverse[1]

    def mask_from_key(self, key: torch.Tensor) -> torch.Tensor:
        """Packed TopHash mask ``[B, W]`` of precomputed keys ``[B, D]``."""
        return tophash_from_keys(key, self.permutation, self.top_k)

    def edit_mask(self, acts: torch.Tensor) -> torch.Tensor:
        """Packed mask ``[1, W]`` of an edit: TopHash of row 0's prompt tokens (the raw prompt)."""
        window = self._window(acts)
        return self.query_bits(acts[:1], None if window is None else window[:1])

    def _decide(self, acts: torch.Tensor) -> RouteDecision:
        call = self.call
        if call is not None and call.reuse is not None and call.reuse.batch == acts.shape[0]:
            return call.reuse
        query = self.query_bits(acts, self._window(acts))
        index, overlap = mask_search(query, self.bank_bits)
        if self.row_active is not None:
            # A withdrawn nearest mask gates nothing (overlap -1 is below every threshold); the
            # row stays in the bank so that no other prompt's nearest mask changes.
            overlap = torch.where(self.row_active[index], overlap, torch.full_like(overlap, -1))
        # The gate (overlap / k >= tau) stays an integer threshold for the down projection to apply.
        decision = RouteDecision(index, overlap, self._min_overlap(), self.bank_bits)
        if call is not None:
            call.decision = decision
        return decision

    def _min_overlap(self) -> int:
        """Smallest overlap o with o / k >= tau, in the same float64 arithmetic as that ratio."""
        k, tau = self.top_k, self.irr_threshold
        o = min(max(math.ceil(tau * k), 0), k + 1)
        while o > 0 and (o - 1) / k >= tau:
            o -= 1
        while o <= k and o / k < tau:
            o += 1
        return o

    # -------------------------------------------------------------------------------- bank edits
    def add_mask(self, bits: torch.Tensor) -> tuple[int, bool]:
        """Store packed mask ``bits [1, W]`` (exactly ``top_k`` bits); returns ``(row, added)``.

        A mask equal to a stored one adds no row. Amortised O(W) whatever the bank's size: the
        storage doubles when full, and duplicates are found through a hash of each stored row's
        words (a hit is confirmed against the row), not by searching the bank.
        """
        rows = self._bank_rows
        bits = bits.to(self._bank_storage.device)
        digest, rows_by_digest = _digest(bits[0]), self._rows_by_digest()
        for row in rows_by_digest.get(digest, ()):
            if torch.equal(self._bank_storage[row], bits[0]):
                return row, False
        if rows == self._bank_storage.shape[0]:
            grown = self._bank_storage.new_zeros(max(16, 2 * rows), self._bank_storage.shape[1])
            grown[:rows] = self._bank_storage[:rows]
            self._bank_storage = grown
        self._bank_storage[rows] = bits[0]
        self._bank_rows = rows + 1
        rows_by_digest.setdefault(digest, []).append(rows)
        return rows, True

    def _rows_by_digest(self) -> dict[int, list[int]]:
        """Bank rows by the hash of their words; built once after the bank was replaced (a load)."""
        if self._digests is None:
            words = self.bank_bits.cpu().numpy()
            self._digests = {}
            for row in range(words.shape[0]):
                self._digests.setdefault(hash(words[row].tobytes()), []).append(row)
        return self._digests


def _digest(words: torch.Tensor) -> int:
    """Hash of one packed mask's words (one device-to-host copy of W words)."""
    return hash(words.cpu().numpy().tobytes())
