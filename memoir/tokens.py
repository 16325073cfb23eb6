"""Tokenisation helpers that do not depend on the tokenizer's padding settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["pad_id_of", "encode", "chat_prompt", "TokenBatch", "batch_prompt_target"]


def pad_id_of(tokenizer) -> int:
    """The id used for padding: pad, else eos, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's usual special tokens (BOS where it adds one)."""
    return list(tokenizer(text)["input_ids"])


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as a user message through the tokenizer's chat template, ready for the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class TokenBatch:
    """Right-padded rows of ``prompt + ' ' + target``, with where each prompt ends."""

    input_ids: torch.Tensor  # [R, L] int64
    attention_mask: torch.Tensor  # [R, L] int64
    prompt_lengths: torch.Tensor  # [R] int64, prompt tokens per row (BOS included)
    lengths: torch.Tensor  # [R] int64, real tokens per row

    def to(self, device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_lengths, self.lengths)))

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, positions)`` of every target token (positions >= prompt length, not padding)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        is_target = (positions >= self.prompt_lengths[:, None]) & (positions < self.lengths[:, None])
        return is_target.nonzero(as_tuple=True)

    def prompt_window(self) -> torch.Tensor:
        """``[R, L]`` bool: the prompt tokens of each row."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return positions < self.prompt_lengths[:, None]


def batch_prompt_target(tokenizer, prompts: list[str], targets: list[str], end_id: int | None = None,
                        separator: str | list[str] = " ") -> TokenBatch:
    """Tokenise ``prompt + separator + target`` rows (right padding); targets may be empty strings.

    ``separator`` (one for every row, or a list with one per row) is ``" "`` for a plain prompt
    (the protocol's ``prompt + ' ' + target``) and ``""`` after a chat template's assistant
    header, where the answer starts the turn.

    The prompt length of a row is the token count of the prompt alone; if the tokenizer merges
    across the boundary, the full sequence is rebuilt from the two halves so the boundary holds.
    With ``end_id``, that token follows every non-empty target (it counts as a target token: the
    end of the answer is then part of what an edit teaches).
    """
    pad = pad_id_of(tokenizer)
    separators = [separator] * len(prompts) if isinstance(separator, str) else list(separator)
    rows, prompt_lengths = [], []
    for prompt, target, separator in zip(prompts, targets, separators, strict=True):
        prompt_ids = encode(tokenizer, prompt)
        full_ids = encode(tokenizer, f"{prompt}{separator}{target}") if target else prompt_ids
        if full_ids[: len(prompt_ids)] != prompt_ids:
            target_ids = tokenizer(separator + target, add_special_tokens=False)["input_ids"]
            full_ids = prompt_ids + list(target_ids)
        if end_id is not None and target:
            full_ids = list(full_ids) + [end_id]
        rows.append(full_ids)
        prompt_lengths.append(len(prompt_ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    lengths = torch.tensor([len(r) for r in rows])
    return TokenBatch(input_ids, attention_mask, torch.tensor(prompt_lengths), lengths)
