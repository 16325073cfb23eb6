"""The real SmolLM2-135M model, each test with its own editor: withdrawing edits, no background given."""

import pytest
import torch

import memoir
from memoir.evaluation import background_sentences, edit_records, teacher_forced

pytestmark = pytest.mark.slow


def test_withdrawing_one_of_three_zsre_edits(smollm2, zsre_records, tmp_path):
    model, tokenizer = smollm2
    edits, _ = edit_records(zsre_records, 3)
    second = tokenizer([edits[1]["src"]], return_tensors="pt")
    with torch.no_grad():
        unedited = model(**second).logits
    editor = memoir.attach(model, tokenizer)
    try:
        editor.fit_background(background_sentences(zsre_records[1000:2000], 100))
        editor.edit_many([{"prompt": r["src"], "target": r["alt"]} for r in edits], progress=False)
        with torch.no_grad():
            assert not torch.equal(editor(**second).logits, unedited)
        editor.withdraw(1)
        with torch.no_grad():
            assert torch.equal(editor(**second).logits, unedited)
        rel = teacher_forced(editor, [edits[0]["src"], edits[2]["src"]], [edits[0]["alt"], edits[2]["alt"]])
        assert rel.accuracy == [1.0, 1.0]
        assert [r.status for r in editor.edits] == ["active", "withdrawn", "active"]
        # A real model's memory saves and loads back bitwise (the fingerprint samples 28M-element tensors).
        editor.save(tmp_path)
        memory = editor.layer.memory.detach().clone()
        editor.detach()
        editor = memoir.load(model, tokenizer, tmp_path)
        assert torch.equal(editor.layer.memory, memory) and editor.edits[1].status == "withdrawn"
        with torch.no_grad():
            assert torch.equal(editor(**second).logits, unedited)
    finally:
        editor.detach()


@pytest.mark.parametrize("flow", ["attach", "easyedit"])
def test_no_background_given_keeps_locality(smollm2, zsre_records, flow):
    """Ten edits with no background sentences at all: mu comes from the bundled set, Loc >= 0.99."""
    from memoir.easyedit import MEMOIRHyperParams, apply_memoir_to_model

    model, tokenizer = smollm2
    edits, _ = edit_records(zsre_records, 10)
    with torch.no_grad():
        before = teacher_forced_unedited(model, tokenizer, edits)
    if flow == "attach":
        editor = memoir.attach(model, tokenizer)
        for record in edits:
            editor.edit(record["src"], record["alt"])
        restore = editor.detach
    else:
        hparams = MEMOIRHyperParams.from_hparams("smollm2-135m")
        assert hparams.dir_background_features is None
        for record in edits:
            request = {"prompt": record["src"], "target_new": record["alt"], "loc_prompt": record["loc"]}
            wrapper, restore = apply_memoir_to_model(model, tokenizer, [request], hparams)
        editor = wrapper.memoir_editor
    try:
        rel = teacher_forced(editor, [r["src"] for r in edits], [r["alt"] for r in edits])
        loc = teacher_forced(editor, [r["loc"] for r in edits], [r["loc_ans"] for r in edits])
        agreement = [float((a == b).float().mean()) for a, b in zip(loc.predictions, before, strict=True)]
        assert sum(agreement) / len(agreement) >= 0.99, agreement
        assert sum(rel.accuracy) / len(rel.accuracy) >= 0.9, rel.accuracy
    finally:
        restore()


def teacher_forced_unedited(model, tokenizer, records):
    """Argmax answer tokens of the unedited model on each record's loc question (no editor attached)."""
    from memoir.tokens import batch_prompt_target

    batch = batch_prompt_target(tokenizer, [r["loc"] for r in records], [r["loc_ans"] for r in records])
    predicted = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.argmax(dim=-1)
    return [predicted[i, int(batch.prompt_lengths[i]) - 1 : int(batch.lengths[i]) - 1] for i in range(len(records))]
