"""Per-row routing in batches, and routing kept through generation (with and without KV cache)."""

import pytest
import torch

from .helpers import EDITS, UNRELATED, edited_tiny_llama, encode


@pytest.fixture(scope="module")
def editor(char_tokenizer):
    return edited_tiny_llama(char_tokenizer)


MIXED = [EDITS[0][0], UNRELATED[0], EDITS[2][0], UNRELATED[2], EDITS[1][0]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_routes_each_row_like_alone(editor, char_tokenizer, side):
    batch = encode(char_tokenizer, MIXED, side)
    with torch.no_grad():
        batched = editor(**batch).logits
    decision = editor.last_decision
    assert decision.gate.tolist() == [True, False, True, False, True]
    assert decision.index[decision.gate].tolist() == [0, 2, 1]
    for row, text in enumerate(MIXED):
        alone = encode(char_tokenizer, [text], side)
        with torch.no_grad():
            single = editor(**alone).logits[0]
        real = batch["attention_mask"][row].bool()
        torch.testing.assert_close(batched[row][real], single, rtol=1e-4, atol=1e-4)
        assert editor.last_decision.gate.item() == decision.gate[row].item()


def test_row_zero_does_not_decide_for_the_batch(editor, char_tokenizer):
    """The reference routes the whole batch from row 0; here an unrelated row 0 changes nothing."""
    batch = encode(char_tokenizer, [UNRELATED[1], EDITS[0][0]])
    with torch.no_grad():
        editor(**batch)
    assert editor.last_decision.gate.tolist() == [False, True]


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_with_and_without_cache_agree(editor, char_tokenizer, side):
    prompts = [EDITS[0][0], UNRELATED[0], EDITS[2][0]] if side == "left" else [EDITS[0][0]]
    batch = encode(char_tokenizer, prompts, side)
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
    cached = editor.generate(**batch, use_cache=True, **settings)
    uncached = editor.generate(**batch, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    # The edit is what gets generated: its target follows the edited prompt.
    new_text = char_tokenizer.decode(cached[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert new_text.strip().startswith(EDITS[0][1][:3]), new_text


def test_decode_steps_reuse_the_prefill_decision(editor, char_tokenizer):
    """A decode step alone (one new token) would hash differently; the cached decision is kept."""
    batch = encode(char_tokenizer, [EDITS[1][0]])
    with torch.no_grad():
        out = editor(**batch, use_cache=True)
        decision = editor._routing.decision
        step = editor(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, batch["input_ids"].shape[1] + 1,
                      dtype=torch.long), past_key_values=out.past_key_values, use_cache=True)
    assert step.logits.shape[1] == 1
    assert editor._routing.decision is decision and bool(decision.gate[0])


def test_prompt_lengths_limit_the_key_to_the_prompt(editor, char_tokenizer):
    prompt, target = EDITS[0]
    full = encode(char_tokenizer, [f"{prompt} {target}"])
    n_prompt = len(char_tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        editor(**full, prompt_lengths=[n_prompt])
    assert editor.last_decision.overlap.item() == editor.layer.top_k  # exactly the edit's own mask
    with pytest.raises(ValueError, match="prompt_lengths"):
        editor(**full, prompt_lengths=[1, 2])
