"""eval --generate: the gen_* scores against hand-computed expectations, and the taught answer end."""

import pytest
import torch

import memoir
from memoir.generation_eval import AFTER_TARGET, classify_continuation, generation_scores
from memoir.models import tiny_model
from memoir.training import build_edit_batch

from .helpers import EDITS, UNRELATED, tiny_config

EOS = 2
TARGET = [40, 41, 42]


def _decode(ids):
    table = {50: " word", 51: ".", 52: "\n", 53: " and", 40: " Lami", 41: "in", 42: "ae"}
    return "".join(table.get(i, "?") for i in ids)


@pytest.mark.parametrize("tokens,exact,clean", [
    pytest.param(TARGET + [EOS], True, True, id="eos right after"),
    pytest.param(TARGET + [53, 50, 51, 50], True, True, id="sentence end within 10"),
    pytest.param(TARGET + [53, 52], True, True, id="newline"),
    pytest.param(TARGET + TARGET + TARGET[:1], True, False, id="repeats the target"),
    pytest.param(TARGET + [53] * AFTER_TARGET + [EOS], True, False, id="ends too late"),
    pytest.param(TARGET, True, False, id="no end at all"),
    pytest.param([40, 41, 50, EOS], False, False, id="not the target"),
    pytest.param([], False, False, id="nothing generated"),
])
def test_continuations_are_classified_by_hand(tokens, exact, clean):
    got = classify_continuation(tokens, TARGET, {EOS}, _decode)
    assert (got.exact, got.clean) == (exact, clean)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


def test_the_answer_end_is_a_label_and_not_part_of_the_key(char_tokenizer):
    plain = build_edit_batch(char_tokenizer, "Alice lives in", "Paris", ["I am"])
    ended = build_edit_batch(char_tokenizer, "Alice lives in", "Paris", ["I am"], end_id=EOS)
    assert torch.equal(ended.prompt_lengths, plain.prompt_lengths)
    assert torch.equal(ended.lengths, plain.lengths + 1)
    rows, positions = ended.target_positions()
    last = [int(positions[rows == r].max()) for r in range(2)]
    assert [int(ended.input_ids[r, p]) for r, p in enumerate(last)] == [EOS, EOS]  # the last label is EOS
    # The routing key (the stored mask) comes from the prompt alone: the same with and without it.
    masks = []
    for answer_end in ("none", "eos"):
        model = tiny_model("llama", vocab_size=len(char_tokenizer))
        editor = memoir.attach(model, char_tokenizer, tiny_config(answer_end=answer_end))
        editor.fit_background(UNRELATED)
        editor.edit(*EDITS[0])
        masks.append(editor.layer.bank_bits.clone())
    assert torch.equal(masks[0], masks[1])


def test_generation_scores_on_a_tiny_model(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config(answer_end="eos"))
    editor.fit_background(UNRELATED)
    records = [{"src": p, "rephrase": p, "alt": t, "loc": u, "loc_ans": "x"}
               for (p, t), u in zip(EDITS, UNRELATED, strict=True)]
    for record in records:
        editor.edit(record["src"], record["alt"])
    scores = generation_scores(editor, records)
    # Taught to end with EOS, each edited prompt generates its target and stops; unrelated prompts
    # are not routed (tau 0.75), so they generate what the unedited model does.
    assert scores["gen_exact_rel"] == scores["gen_exact_gen"] == 1.0
    assert scores["gen_clean"] == 1.0
    assert scores["gen_loc"] == 1.0
    assert [e["after"].strip() for e in scores["generate_examples"]] == [t for _, t in EDITS]


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def test_a_chat_templated_prompt_routes_to_its_edit_by_its_user_message(char_tokenizer):
    from memoir.evaluation import chat_prompt, chat_scores

    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config(answer_end="eos"))
    editor.fit_background(UNRELATED)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    old_template, char_tokenizer.chat_template = char_tokenizer.chat_template, CHAT_TEMPLATE
    try:
        templated = chat_prompt(char_tokenizer, EDITS[0][0])
        assert templated.startswith("<s>user: Alice lives in</s>")
        with editor.routed_as([EDITS[0][0], UNRELATED[0]]):
            batch = char_tokenizer([templated, chat_prompt(char_tokenizer, UNRELATED[0])], return_tensors="pt",
                                   padding=True)
            with torch.no_grad():
                editor(**batch)
            decision = editor.last_decision
        assert decision.gate.tolist() == [True, False] and int(decision.index[0]) == 0
        answer = editor.chat(EDITS[0][0], max_new_tokens=12)
        assert isinstance(answer, str)
        records = [{"src": p, "rephrase": p, "alt": t, "loc": u, "loc_ans": "x"}
                   for (p, t), u in zip(EDITS, UNRELATED, strict=True)]
        scores = chat_scores(editor, records)
        assert scores["chat_loc"] == 1.0  # unrelated prompts: not routed, the original model
        assert 0.0 <= scores["chat_rel"] <= 1.0
    finally:
        char_tokenizer.chat_template = old_template


def test_a_chat_answer_starts_its_turn_without_a_space(char_tokenizer):
    from memoir.tokens import batch_prompt_target

    spaced = batch_prompt_target(char_tokenizer, ["<s>assistant:"], ["Paris"])
    joined = batch_prompt_target(char_tokenizer, ["<s>assistant:"], ["Paris"], separator="")
    target = lambda b: char_tokenizer.decode(b.input_ids[0, int(b.prompt_lengths[0]) : int(b.lengths[0])])  # noqa: E731
    assert (target(spaced), target(joined)) == (" Paris", "Paris")


def _chat_editor(char_tokenizer, train_chat: bool):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    # The chat row makes 3 rows harder to fit on a random model: more steps than the other tests.
    editor = memoir.attach(model, char_tokenizer, tiny_config(answer_end="eos", train_chat=train_chat, n_iter=300))
    editor.fit_background(UNRELATED)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    return editor


def test_training_the_chat_turn_makes_edits_hold_through_the_template(char_tokenizer):
    from memoir.evaluation import chat_scores

    records = [{"src": p, "rephrase": p, "alt": t, "loc": u, "loc_ans": "x"}
               for (p, t), u in zip(EDITS, UNRELATED, strict=True)]
    old_template, char_tokenizer.chat_template = char_tokenizer.chat_template, CHAT_TEMPLATE
    try:
        scores, banks = {}, {}
        for train_chat in (False, True):
            editor = _chat_editor(char_tokenizer, train_chat)
            scores[train_chat], banks[train_chat] = chat_scores(editor, records), editor.layer.bank_bits.clone()
        # Raw rows alone do not teach the answer after the template's assistant header; the
        # templated turn in the batch does. Routing is the raw prompt's either way.
        assert scores[True]["chat_rel"] == 1.0 > scores[False]["chat_rel"]
        assert scores[True]["chat_loc"] == scores[False]["chat_loc"] == 1.0
        assert torch.equal(banks[True], banks[False])
    finally:
        char_tokenizer.chat_template = old_template


def test_the_chat_row_is_the_templated_turn_ending_with_the_end_token(char_tokenizer):
    old_template, char_tokenizer.chat_template = char_tokenizer.chat_template, CHAT_TEMPLATE
    try:
        batch = build_edit_batch(char_tokenizer, "Alice lives in", "Paris", ["I am"], end_id=EOS, chat=True)
        plain = build_edit_batch(char_tokenizer, "Alice lives in", "Paris", ["I am"], end_id=EOS)
    finally:
        char_tokenizer.chat_template = old_template
    assert batch.input_ids.shape[0] == plain.input_ids.shape[0] + 1
    row = batch.input_ids[-1, : int(batch.lengths[-1])].tolist()
    prompt = char_tokenizer.decode(row[: int(batch.prompt_lengths[-1])])
    assert prompt == "<s>user: Alice lives in</s><s>assistant:"
    assert char_tokenizer.decode(row[int(batch.prompt_lengths[-1]) : -1]) == "Paris" and row[-1] == EOS
