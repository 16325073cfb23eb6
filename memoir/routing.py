"""Per-call routing state: which tokens are the prompt, and decisions kept across decode steps.

The editor registers one forward pre-hook on the model (removed on detach). For each call it tells
the layer either the prompt window of the input or a decision to reuse:

* a call that continues earlier tokens (a non-empty KV cache under any keyword, or an attention
  mask longer than its new tokens) continues the sequences of the last decision: reuse it;
* a call whose ``input_ids`` extend the last routed ``input_ids`` (generation without a cache) is
  the same sequences: reuse it;
* otherwise the prompt is every non-padding token, or the first ``prompt_lengths[b]`` real tokens
  of row b when the caller passes ``prompt_lengths`` (teacher-forced scoring of prompt + answer).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .layer import CallContext, RouteDecision

__all__ = ["RoutingState", "prompt_window", "cached_length"]


def prompt_window(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` bool: real tokens, limited to the first ``prompt_lengths[b]`` real tokens of row b.

    Works for left and right padding: a token's rank among its row's real tokens decides.
    """
    real = attention_mask.bool()
    if prompt_lengths is None:
        return real
    rank = real.long().cumsum(dim=1) - 1
    return real & (rank < prompt_lengths.to(rank.device)[:, None])


def _cache_length(value) -> int:
    """Tokens held by a KV cache object (any ``Cache`` class) or a legacy tuple cache; 0 otherwise."""
    if value is None:
        return 0
    if hasattr(value, "get_seq_length"):
        return int(value.get_seq_length())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and value[0] \
            and isinstance(value[0][0], torch.Tensor):
        return int(value[0][0].shape[-2])  # legacy ((key, value), ...) per layer
    return 0


def cached_length(args: tuple, kwargs: dict, attention_mask=None, seq_len: int | None = None) -> int:
    """How many earlier tokens of these sequences a forward call continues from (0: a new prompt).

    Read from whatever the caller passed, not from one keyword: transformers 5.17 passes the
    cache as ``past_key_values``, 5.25 as ``cache``, and a KV cache object is recognised under any
    name or position; an attention mask longer than the new tokens also says earlier tokens exist.
    """
    length = max((_cache_length(v) for v in (*args, *kwargs.values())), default=0)
    if attention_mask is not None and seq_len is not None and attention_mask.dim() == 2:
        length = max(length, attention_mask.shape[1] - seq_len)
    return length


def _as_lengths(prompt_lengths, batch: int, device) -> torch.Tensor:
    lengths = torch.as_tensor(prompt_lengths, dtype=torch.int64, device=device).reshape(-1)
    if lengths.shape[0] != batch:
        raise ValueError(f"prompt_lengths has {lengths.shape[0]} entries for a batch of {batch}")
    if (lengths < 1).any():
        raise ValueError("prompt_lengths must be >= 1 for every row")
    return lengths


class _ThreadRouting(threading.local):
    """One thread's last decision, the input it was made for, and the call in progress."""

    def __init__(self) -> None:
        self.generation = -1
        self.decision: RouteDecision | None = None
        self.input_ids: torch.Tensor | None = None
        self.pending: CallContext | None = None
        self.pending_ids: torch.Tensor | None = None
        self.forced: RouteDecision | None = None


class RoutingState:
    """Per thread: the last routing decision and the input it was made for (each thread's calls and
    generations route on their own inputs, whatever other threads run at the same time)."""

    def __init__(self) -> None:
        self._threads = _ThreadRouting()
        self._generation = 0

    def _mine(self) -> _ThreadRouting:
        mine = self._threads
        if mine.generation != self._generation:  # reset() since this thread last routed
            mine.__init__()
            mine.generation = self._generation
        return mine

    @property
    def decision(self) -> RouteDecision | None:
        return self._mine().decision

    def reset(self) -> None:
        """Forget every thread's last decision (a new bank, a new memory)."""
        self._generation += 1

    @contextlib.contextmanager
    def fixed(self, decision: RouteDecision):
        """Within the block, every forward call of this thread uses ``decision`` (one per row)."""
        mine = self._mine()
        previous, mine.forced = mine.forced, decision
        try:
            yield
        finally:
            self._mine().forced = previous

    def plan(self, input_ids, attention_mask, past_length: int, prompt_lengths, batch: int, seq_len: int,
             device) -> CallContext:
        """The context for this call (see module docstring); ``past_length`` from :func:`cached_length`."""
        mine = self._mine()
        if mine.forced is not None:
            if mine.forced.batch != batch:
                raise ValueError(f"the routing was fixed for {mine.forced.batch} sequences, this call has {batch}")
            return CallContext(reuse=mine.forced)
        reusable = mine.decision is not None and mine.decision.batch == batch
        if reusable and past_length > 0:
            return CallContext(reuse=mine.decision)
        if prompt_lengths is None and reusable and self._extends_last(mine, input_ids):
            return CallContext(reuse=mine.decision)
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq_len, dtype=torch.int64, device=device)
        elif attention_mask.shape[1] != seq_len:  # a mask covering cached tokens: keep the new ones
            attention_mask = attention_mask[:, -seq_len:]
        lengths = None if prompt_lengths is None else _as_lengths(prompt_lengths, batch, attention_mask.device)
        mine.pending, mine.pending_ids = CallContext(window=prompt_window(attention_mask, lengths)), input_ids
        return mine.pending

    @staticmethod
    def _extends_last(mine: _ThreadRouting, input_ids) -> bool:
        last = mine.input_ids
        if input_ids is None or last is None or input_ids.shape[1] <= last.shape[1]:
            return False
        return bool(torch.equal(input_ids[:, : last.shape[1]], last))

    def finish(self) -> None:
        """Keep the decision the layer made during the call just run."""
        mine = self._mine()
        if mine.pending is not None and mine.pending.decision is not None:
            mine.decision, mine.input_ids = mine.pending.decision, mine.pending_ids
        mine.pending = mine.pending_ids = None
