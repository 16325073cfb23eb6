"""The real SmolLM2-135M model: edits stick, paraphrases follow, unrelated prompts are untouched."""

import pytest
import torch

import memoir
from memoir.evaluation import (
    background_sentences,
    edit_records,
    evaluate_sequential,
    sweep_thresholds,
    teacher_forced,
    unedited_scores,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ten_edit_report(smollm2, zsre_records):
    model, tokenizer = smollm2
    editor = memoir.attach(model, tokenizer)
    edits, _ = edit_records(zsre_records, 10)
    baseline = unedited_scores(editor, edits)
    report = evaluate_sequential(editor, edits, background_sentences(zsre_records[1000:2000], 100), progress=False,
                                 baseline=baseline)
    yield editor, report, baseline
    editor.detach()


def test_ten_sequential_zsre_edits(ten_edit_report):
    _, report, _ = ten_edit_report
    assert report["rel"] >= 0.9, report
    assert report["loc"] >= 0.95, report
    assert report["rel"] > report["pre_rel"] + 0.5  # the edits changed the answers
    assert report["edit_routed_to_own_mask"] == 1.0


def test_unrelated_prompts_are_bitwise_untouched(ten_edit_report, zsre_records):
    editor, _, _ = ten_edit_report
    locs = [r["loc"] for r in zsre_records[1000:1010]]
    route = editor.route(locs)
    ungated = [i for i, gate in enumerate(route["gate"]) if not gate]
    assert len(ungated) >= 8, route
    batch = editor.tokenizer([locs[i] for i in ungated], return_tensors="pt", padding=True)
    with torch.no_grad():
        edited = editor(**batch).logits
        with editor.unedited():
            original = editor(**batch).logits
    assert torch.equal(edited, original)


def test_generate_writes_the_new_fact(ten_edit_report, zsre_records):
    editor, _, _ = ten_edit_report
    record = zsre_records[0]
    batch = editor.tokenizer([record["src"]], return_tensors="pt")
    out = editor.generate(**batch, max_new_tokens=8, do_sample=False, temperature=None, top_p=None, top_k=None)
    text = editor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip().startswith(record["alt"].strip().split()[0]), (text, record["alt"])


def test_threshold_sweep_equals_scoring_everything_at_each_tau(ten_edit_report, zsre_records):
    editor, report, baseline = ten_edit_report
    edits, _ = edit_records(zsre_records, 10)
    taus = (0.4, 0.5, 0.55, 0.7, 0.9)
    sweep = sweep_thresholds(editor, edits, report, baseline, taus)
    original = editor.layer.irr_threshold
    expected = []
    try:
        for tau in taus:  # the plain way: route and score every row again
            editor.layer.irr_threshold = tau
            rel = teacher_forced(editor, [r["src"] for r in edits], [r["alt"] for r in edits])
            gen = teacher_forced(editor, [r["rephrase"] for r in edits], [r["alt"] for r in edits])
            loc = teacher_forced(editor, [r["loc"] for r in edits], [r["loc_ans"] for r in edits])
            agree = [float((a == b).float().mean()) for a, b in zip(loc.predictions, baseline.loc.predictions, strict=True)]
            expected.append({"tau": tau, "rel": sum(rel.accuracy) / 10, "gen": sum(gen.accuracy) / 10,
                             "loc": sum(agree) / 10})
    finally:
        editor.layer.irr_threshold = original
    assert editor.layer.irr_threshold == original
    assert len({(row["gen"], row["loc"]) for row in expected}) >= 3  # gates do flip between these taus
    for got, want in zip(sweep, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-12), (got, want)
