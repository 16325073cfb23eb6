"""Routing through ``generate`` whatever the transformers version passes to decode steps.

The oracle is built without ``generate`` and without a cache: a greedy step is the argmax of a full
forward of prompt + tokens so far, with the routing decided from the prompt tokens only
(``prompt_lengths``), token by token. ``make transformers-latest-check`` runs this file under the
newest transformers release too.
"""

import pytest
import torch

from .helpers import EDITS, UNRELATED, edited_tiny_llama

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def editor(char_tokenizer):
    return edited_tiny_llama(char_tokenizer)


@torch.no_grad()
def _fixed_routing_continuation(editor, prompt: str) -> list[int]:
    ids = editor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    prompt_length = ids.shape[1]
    for _ in range(NEW_TOKENS):
        logits = editor(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_lengths=[prompt_length],
                        use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids[0, prompt_length:].tolist()


def _generated(generate, tokenizer, prompts: list[str], use_cache: bool) -> list[list[int]]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                       use_cache=use_cache, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return out[:, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("entry", ["editor.generate", "model.generate"])
def test_generation_follows_the_prompts_routing_at_every_step(editor, char_tokenizer, entry, use_cache):
    prompts = [p for p, _ in EDITS] + UNRELATED[:1]
    expected = [_fixed_routing_continuation(editor, p) for p in prompts]
    assert editor.route(prompts)["gate"] == [True] * len(EDITS) + [False]
    generate = editor.generate if entry == "editor.generate" else editor.model.generate
    got = _generated(generate, char_tokenizer, prompts, use_cache)
    assert got == expected
    for (_, target), tokens in zip(EDITS, got[: len(EDITS)], strict=True):  # the edits are what is generated
        assert char_tokenizer.decode(tokens).strip().startswith(target), (target, char_tokenizer.decode(tokens))


def test_one_prompt_alone_gives_the_same_tokens_as_in_the_batch(editor, char_tokenizer):
    prompts = [p for p, _ in EDITS]
    batched = _generated(editor.generate, char_tokenizer, prompts, use_cache=True)
    alone = [_generated(editor.generate, char_tokenizer, [p], use_cache=True)[0] for p in prompts]
    assert batched == alone
