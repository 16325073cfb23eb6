"""Rehearsal: which stored edits a new edit's training batch also holds, and that batch.

On a small MLP (D = 1536 on SmolLM2) different prompts share ~45% of their hashed columns, so
training a new edit moves the outputs of the stored edits whose masks overlap its mask. Putting
those edits' own rows (``prompt + ' ' + target``, each trained with its *stored* mask) into the
new edit's batch makes the optimiser keep them while it writes the new fact.

Choosing them is one top-r mask search of the new edit's mask over the bank (the same kernels and
tie rule as the routing search), then a filter on the registry: only active edits are rehearsed,
never an edit of the same prompt (it is being replaced) or one whose mask equals the new one (it
shares all its columns: the new edit supersedes it there).
"""

from __future__ import annotations

import torch

from memoir_kernels import mask_search_topk

from .config import MemoirConfig
from .registry import EditRecord, EditRegistry
from .tokens import TokenBatch, batch_prompt_target
from .training import Rehearsal, build_edit_batch, edit_prompts, edit_rows

__all__ = ["choose_rehearsal", "build_training_batch"]


def _top_rows(query_bits: torch.Tensor, bank_bits: torch.Tensor, count: int) -> tuple[list[int], list[int]]:
    """Bank rows by overlap with ``query_bits [1, W]``, best first (ties to the lower row), and overlaps."""
    index, overlap = mask_search_topk(query_bits, bank_bits, count)
    pairs = [(int(i), int(o)) for i, o in zip(index[0].tolist(), overlap[0].tolist(), strict=True) if i >= 0]
    return [i for i, _ in pairs], [o for _, o in pairs]


def choose_rehearsal(registry: EditRegistry, bank_bits: torch.Tensor, query_bits: torch.Tensor,
                     config: MemoirConfig, top_k: int, prompt: str) -> list[EditRecord]:
    """The stored edits to rehearse while training an edit of ``prompt`` whose mask is ``query_bits [1, W]``.

    ``config.rehearse`` edits at most, each overlapping the new mask by at least
    ``config.rehearse_min_overlap`` (ratio to k); ``rehearse_select`` ``overlap`` takes the most
    overlapping masks, ``recent`` the newest edits. One edit per bank row (the newest active one).
    """
    wanted = config.rehearse or 0
    num_rows = bank_bits.shape[0]
    if wanted <= 0 or num_rows == 0:
        return []
    floor = config.rehearse_min_overlap * top_k
    if config.rehearse_select == "recent":
        return _recent(registry, bank_bits, query_bits, wanted, floor, top_k, prompt)
    # Rows that cannot be rehearsed (withdrawn, or only the same prompt's edit) are skipped after
    # the search: fetch enough candidates that r usable ones remain when there are r.
    same_prompt_only = sum(1 for r in registry.find(prompt) if _usable_on_row(registry, r.mask_row, prompt) is None)
    unusable = num_rows - (registry.rows_with_active_edits() - same_prompt_only)
    rows, overlaps = _top_rows(query_bits, bank_bits, min(num_rows, wanted + unusable + 1))
    chosen = []
    for row, overlap in zip(rows, overlaps, strict=True):
        if overlap < floor or len(chosen) == wanted:
            break
        record = _usable_on_row(registry, row, prompt)
        if record is not None and overlap < top_k:
            chosen.append(record)
    return chosen


def _usable_on_row(registry: EditRegistry, row: int, prompt: str) -> EditRecord | None:
    records = [r for r in registry.active_on_row(row) if r.prompt != prompt]
    return records[-1] if records else None


def _recent(registry: EditRegistry, bank_bits, query_bits, wanted: int, floor: float, top_k: int,
            prompt: str) -> list[EditRecord]:
    chosen, seen_rows = [], set()
    for record in reversed(registry.records):
        if len(chosen) == wanted:
            break
        if not record.active or record.prompt == prompt or record.mask_row in seen_rows:
            continue
        seen_rows.add(record.mask_row)
        _, overlap = _top_rows(query_bits, bank_bits[record.mask_row : record.mask_row + 1], 1)
        if floor <= overlap[0] < top_k:
            chosen.append(record)
    return chosen


def build_training_batch(tokenizer, prompt: str, target: str, prefixes: list[str], rehearsed: list[EditRecord],
                         bank_bits: torch.Tensor, config: MemoirConfig, end_id: int | None = None,
                         chat: bool = False) -> tuple[TokenBatch, Rehearsal | None]:
    """The edit's batch (its row, one row per context prefix, with ``chat`` its chat-templated
    turn: :func:`memoir.training.edit_rows`) followed by the rehearsed rows.

    Each rehearsed edit gives its ``prompt + ' ' + target`` row (and, with ``rehearse_prefixes``,
    its prefixed rows too), trained with its stored mask and weighted ``rehearse_weight`` in the
    loss. With nothing to rehearse the batch is exactly the faithful recipe's.
    """
    if not rehearsed:
        return build_edit_batch(tokenizer, prompt, target, prefixes, end_id, chat), None
    prompts, separators = edit_rows(tokenizer, prompt, prefixes, chat)
    targets = [target] * len(prompts)
    rows = []
    for record in rehearsed:
        texts = edit_prompts(record.prompt, prefixes if config.rehearse_prefixes else [])
        rows += [(text, record.target, record.mask_row) for text in texts]
    batch = batch_prompt_target(tokenizer, prompts + [r[0] for r in rows], targets + [r[1] for r in rows], end_id,
                                separators + [" "] * len(rows))
    bits = bank_bits[torch.tensor([r[2] for r in rows], device=bank_bits.device)]
    weights = torch.ones(len(prompts) + len(rows), dtype=torch.float64)
    weights[len(prompts):] = config.rehearse_weight
    return batch, Rehearsal(bits, weights)
