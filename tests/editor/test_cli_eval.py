"""`python -m memoir eval` end to end on a tiny saved model: record selection, report keys, JSON."""

import json
import math

import pytest
import torch

from memoir.cli import main
from memoir.evaluation import background_sentences
from memoir.models import tiny_model

# Two subjects asked twice with different targets, one record with an empty target, one unique subject.
RECORDS = [
    {"subject": "Alice", "src": "Alice lives in", "alt": "Paris", "rephrase": "Alice's home is in"},
    {"subject": "Alice", "src": "Where does Alice live?", "alt": "Rome", "rephrase": "Alice lives where?"},
    {"subject": "Nobody", "src": "Nobody knows", "alt": "", "rephrase": "No one knows"},
    {"subject": "Sky", "src": "The sky is", "alt": "blue", "rephrase": "The colour of the sky is"},
    {"subject": "Sky", "src": "What colour is the sky?", "alt": "green", "rephrase": "Sky colour?"},
    {"subject": "Bob", "src": "Bob works at", "alt": "Acme", "rephrase": "Bob's employer is"},
]
LOC = [{"loc": f"Question {i}: what is {i} plus one?", "loc_ans": str(i + 1)} for i in range(6)]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, char_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def run_eval(tmp_path, saved_model, *options):
    data, loc, out = tmp_path / "records.json", tmp_path / "loc.json", tmp_path / "out.json"
    data.write_text(json.dumps([dict(r, loc=LOC[i]["loc"], loc_ans=LOC[i]["loc_ans"]) for i, r in enumerate(RECORDS)]))
    loc.write_text(json.dumps([dict(RECORDS[0], **record) for record in LOC]))
    args = ["eval", "--model", str(saved_model), "--data", str(data), "--loc-data", str(loc), "--edits", "3",
            "--top-k", "40", "--irr-threshold", "0.75", "--n-iter", "3", "--curve-points", "0", "--quiet",
            "--out", str(out), *options]
    assert main(args) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("one_per_subject", [False, True])
def test_eval_writes_the_protocol_keys_for_the_chosen_stream(tmp_path, saved_model, one_per_subject, capsys):
    """The protocol's numbers are there and hold values, not just numbers of the right type (a NaN
    would be a float): shares finite and in [0, 1], each summary score the mean of the per-edit
    values the same JSON carries, Avg the mean of Rel, Gen and Loc, one per-edit value per --edits,
    and each overlap ratio a whole number of the top_k = 40 positions."""
    report = run_eval(tmp_path, saved_model, *(["--one-per-subject"] if one_per_subject else []))
    edits = 3  # --edits
    assert report["edits"] == edits
    per_edit = report["per_record"]
    for key in ("rel", "gen", "loc", "avg", "pre_rel", "pre_gen", "overlap_edit", "overlap_rephrase",
                "overlap_unrelated"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and 0 <= report[key] <= 1, key
    for key in ("rel", "gen", "loc", "overlap_edit", "overlap_rephrase", "overlap_unrelated"):
        shares = per_edit[key]
        assert len(shares) == edits and all(math.isfinite(v) and 0 <= v <= 1 for v in shares), key
        assert report[key] == pytest.approx(math.fsum(shares) / edits, abs=1e-12), key
    assert report["avg"] == pytest.approx((report["rel"] + report["gen"] + report["loc"]) / 3, abs=1e-12)
    for values in ("overlap_edit", "overlap_rephrase", "overlap_unrelated"):
        assert all(abs(v * 40 - round(v * 40)) < 1e-9 for v in per_edit[values]), values
    assert math.isfinite(report["sec_per_edit"]) and report["sec_per_edit"] > 0
    assert report["skipped_empty_target"] == 1
    if one_per_subject:
        # Alice (0), Sky (3), Bob (5): no edit contradicts another
        assert report["one_per_subject"] is True and report["last_source_record"] == 5
        assert report["contradicted_later"] == 0
        assert "edit stream: the first record of each subject, records 0-5" in capsys.readouterr().out
    else:
        # records 0, 1, 3: Alice's first edit is contradicted by her second
        assert "one_per_subject" not in report and report["contradicted_later"] == 1


def test_num_background_sets_how_many_sentences_make_mu(tmp_path, saved_model, char_tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from memoir import MemoirConfig, attach
    from memoir.persistence import MEMORY_FILE

    memory = tmp_path / "memory"
    report = run_eval(tmp_path, saved_model, "--num-background", "2", "--save-memory", str(memory))
    assert report["config"]["num_background"] == 2
    stored_mu = load_file(memory / MEMORY_FILE)["background_mean"]
    # An independent editor fitted on the first two background sentences gives the same mu; six give another.
    editor = attach(AutoModelForCausalLM.from_pretrained(saved_model), char_tokenizer,
                    MemoirConfig(top_k=40, irr_threshold=0.75))
    sentences = background_sentences(LOC, len(LOC))
    assert torch.equal(stored_mu, editor.collect_keys(sentences[:2]).mean(dim=0))
    assert not torch.equal(stored_mu, editor.collect_keys(sentences).mean(dim=0))


def test_missing_or_malformed_records_file_is_named_with_the_fix(tmp_path):
    from memoir.evaluation import load_zsre

    with pytest.raises(FileNotFoundError, match="MEMOIR_ZSRE_DATA"):
        load_zsre(tmp_path / "absent.json")
    (tmp_path / "object.json").write_text('{"src": "x"}')
    with pytest.raises(ValueError, match="not a JSON array"):
        load_zsre(tmp_path / "object.json")


def test_saved_eval_memory_carries_the_registry_and_rehearsal_counts(tmp_path, saved_model):
    from memoir.persistence import read_registry

    memory = tmp_path / "memory"
    report = run_eval(tmp_path, saved_model, "--rehearse", "2", "--save-memory", str(memory))
    registry = read_registry(memory)
    assert [(r.prompt, r.target) for r in registry] == [("Alice lives in", "Paris"), ("Where does Alice live?", "Rome"),
                                                         ("The sky is", "blue")]
    assert [r.rehearsed for r in registry] == report["per_record"]["rehearsed"] == [0, 1, 2]
    assert report["config"]["rehearse"] == 2 and report["mean_rehearsed"] == 1.0
    assert [r.final_loss for r in registry] == report["per_record"]["final_loss"]


def test_no_background_takes_mu_from_the_bundled_sentences(tmp_path, saved_model, char_tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from memoir import MemoirConfig, attach
    from memoir.background import GENERIC_SENTENCES
    from memoir.persistence import MEMORY_FILE

    memory = tmp_path / "memory"
    run_eval(tmp_path, saved_model, "--no-background", "--save-memory", str(memory))
    stored_mu = load_file(memory / MEMORY_FILE)["background_mean"]
    editor = attach(AutoModelForCausalLM.from_pretrained(saved_model), char_tokenizer,
                    MemoirConfig(top_k=40, irr_threshold=0.75))
    assert torch.equal(stored_mu, editor.collect_keys(list(GENERIC_SENTENCES)).mean(dim=0))


def test_a_loaded_memory_scores_as_it_did_when_made(tmp_path, saved_model):
    memory = tmp_path / "memory"
    made = run_eval(tmp_path, saved_model, "--save-memory", str(memory))
    loaded = run_eval(tmp_path, saved_model, "--load-memory", str(memory))
    for key in ("rel", "gen", "loc", "pre_rel", "pre_gen", "edit_routed_to_own_mask"):
        assert loaded[key] == made[key], key
    assert loaded["per_record"]["rel"] == made["per_record"]["rel"]
