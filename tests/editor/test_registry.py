"""The edit registry: records saved with the memory, withdraw, replace, export and replay, the CLI."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import memoir
from memoir.cli import main as cli_main
from memoir.models import tiny_model
from memoir.persistence import MEMORY_FILE, read_metadata

from .helpers import EDITS, UNRELATED, logits, target_accuracy, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


def _editor(tokenizer, edits=EDITS, **changes):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    editor = memoir.attach(model, tokenizer, tiny_config(**changes))
    editor.fit_background(UNRELATED)
    for prompt, target in edits:
        editor.edit(prompt, target)
    return model, editor


def test_records_list_every_edit_in_order(char_tokenizer):
    _, editor = _editor(char_tokenizer)
    assert [(r.index, r.prompt, r.target, r.status) for r in editor.edits] == [
        (i, p, t, "active") for i, (p, t) in enumerate(EDITS)]
    for record, result in zip(editor.edits, editor.history, strict=True):
        assert record.iterations == len(result.losses) > 0
        assert record.final_loss == result.losses[-1]
        assert record.mask_row == result.mask_row and record.time.endswith("Z")
    assert editor.find(EDITS[1][0]) == [editor.edits[1]]
    assert editor.find("never edited") == []
    with pytest.raises(AttributeError):
        editor.edits[0].status = "withdrawn"  # records are read-only


def test_saved_registry_loads_back_equal_in_a_new_process(char_tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    model.save_pretrained(tmp_path / "model")
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    editor.withdraw(1)
    editor.save(tmp_path / "memory")
    script = (
        "import json, sys, warnings; warnings.simplefilter('ignore')\n"
        "from transformers import AutoModelForCausalLM\n"
        "import memoir\n"
        "from tests.conftest import char_tokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r})\n"
        f"editor = memoir.load(model, char_tokenizer.__wrapped__(), {str(tmp_path / 'memory')!r})\n"
        "print(json.dumps([r.to_dict() for r in editor.edits]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [r.to_dict() for r in editor.edits]
    assert loaded[1]["status"] == "withdrawn" and loaded[0]["status"] == "active"


def test_withdraw_restores_the_original_model_for_that_prompt_only(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    prompts = [p for p, _ in EDITS] + UNRELATED
    original, mask = logits(model, char_tokenizer, prompts)
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    before, _ = logits(model, char_tokenizer, prompts)
    assert editor.route([EDITS[1][0]])["gate"] == [True]
    assert not torch.equal(before[1][mask[1].bool()], original[1][mask[1].bool()])  # the edit changed it

    editor.withdraw(1)
    after, _ = logits(model, char_tokenizer, prompts)
    for row, prompt in enumerate(prompts):
        real = mask[row].bool()
        expected = original if row == 1 else before
        assert torch.equal(after[row][real], expected[row][real]), prompt
    assert target_accuracy(editor, *EDITS[0]) == 1.0 and target_accuracy(editor, *EDITS[2]) == 1.0
    assert editor.edits[1].status == "withdrawn" and editor.find(EDITS[1][0]) == []
    with pytest.raises(ValueError, match="not active"):
        editor.withdraw(1)
    with pytest.raises(IndexError, match="no edit 7"):
        editor.withdraw(7)


def test_a_row_shared_by_two_edits_keeps_routing_while_one_is_active(char_tokenizer):
    # top_k = D: every prompt's mask is all of D, so both edits store one and the same row.
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    width = model.config.intermediate_size
    editor = memoir.attach(model, char_tokenizer, tiny_config(top_k=width, rehearse=0))
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    editor.edit(*EDITS[1])
    assert editor.layer.num_masks == 1 and [r.mask_row for r in editor.edits] == [0, 0]
    kept, _ = logits(model, char_tokenizer, [EDITS[1][0]])
    editor.withdraw(0)
    still, _ = logits(model, char_tokenizer, [EDITS[1][0]])
    assert editor.route([EDITS[1][0]])["gate"] == [True]
    assert torch.equal(kept, still)
    editor.withdraw(1)  # the last active edit on the row: now it stops routing
    assert editor.route([EDITS[1][0]])["gate"] == [False]


def test_editing_an_edited_prompt_replaces_it(char_tokenizer):
    _, editor = _editor(char_tokenizer, edits=[("Alice lives in", "Paris"), ("The sky is", "blue")])
    editor.edit("Alice lives in", "Rome")
    assert target_accuracy(editor, "Alice lives in", "Rome") == 1.0
    first = editor.edits[0]
    assert first.status == "replaced" and first.replaced_by == 2 and first.status_text == "replaced by edit 2"
    assert editor.find("Alice lives in") == [editor.edits[2]]
    assert target_accuracy(editor, "The sky is", "blue") == 1.0


def test_export_then_replay_onto_a_fresh_model(char_tokenizer, tmp_path):
    _, editor = _editor(char_tokenizer)
    editor.withdraw(0)
    count = editor.export_edits(tmp_path / "edits.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert count == 2 and [(x["prompt"], x["target"]) for x in lines] == EDITS[1:]
    assert all(x["time"] == r.time for x, r in zip(lines, editor.edits[1:], strict=True))

    fresh = memoir.attach(tiny_model("llama", seed=3, vocab_size=len(char_tokenizer)), char_tokenizer, tiny_config())
    fresh.fit_background(UNRELATED)
    fresh.edit_many(str(tmp_path / "edits.jsonl"), progress=False)
    assert [(r.prompt, r.target, r.status) for r in fresh.edits] == [(p, t, "active") for p, t in EDITS[1:]]
    assert all(target_accuracy(fresh, p, t) == 1.0 for p, t in EDITS[1:])


def test_checkpoint_resume_carries_the_registry(char_tokenizer, tmp_path):
    requests = [{"prompt": p, "target": t} for p, t in EDITS]
    _, whole = _editor(char_tokenizer, edits=[])
    whole.edit_many(requests, progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
    _, resumed = _editor(char_tokenizer, edits=[])
    resumed.edit_many(requests, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert [r.to_dict() for r in resumed.edits] == [r.to_dict() for r in whole.edits]


def test_a_memory_saved_before_the_registry_loads_with_no_records(char_tokenizer, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, editor = _editor(char_tokenizer, edits=EDITS[:2])
    editor.save(tmp_path / "memory")
    expected, mask = logits(model, char_tokenizer, [EDITS[0][0]])
    editor.detach()
    # Rewrite the file as format version 1 wrote it: no registry in the header.
    path = tmp_path / "memory" / MEMORY_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    del metadata["edit_registry"]
    metadata["format_version"] = "1"
    save_file(tensors, str(path), metadata=metadata)

    with pytest.warns(UserWarning, match="before the edit registry"):
        loaded = memoir.load(model, char_tokenizer, tmp_path / "memory")
    assert loaded.edits == () and loaded.registry.unrecorded == 2
    got, _ = logits(model, char_tokenizer, [EDITS[0][0]])
    assert torch.equal(got, expected)  # its edits keep routing
    with pytest.warns(UserWarning, match="without rehearsal"):
        loaded.edit(*EDITS[2])
    assert [r.prompt for r in loaded.edits] == [EDITS[2][0]] and loaded.edits[0].rehearsed == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next edit edits without rehearsal silently
        loaded.edit("Carol plays", "chess")
    assert [r.rehearsed for r in loaded.edits] == [0, 0]


def _saved(char_tokenizer, tmp_path):
    model, editor = _editor(char_tokenizer)
    editor.save(tmp_path / "memory")
    editor.detach()
    return model, tmp_path / "memory"


def test_cli_lists_the_registry(char_tokenizer, tmp_path, capsys):
    _, directory = _saved(char_tokenizer, tmp_path)
    assert cli_main(["edits", str(directory)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["#", "status", "time"]
    for line, (prompt, target) in zip(table[1:], EDITS, strict=True):
        assert prompt in line and target in line and "active" in line
    assert cli_main(["edits", str(directory), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["prompt"], r["target"], r["status"]) for r in listed] == [(p, t, "active") for p, t in EDITS]


def test_cli_withdraws_in_the_saved_memory(char_tokenizer, tmp_path, capsys):
    model, directory = _saved(char_tokenizer, tmp_path)
    before = read_metadata(directory)
    assert cli_main(["edits", str(directory), "--withdraw", "2"]) == 0
    after = read_metadata(directory)
    changed = {"edit_registry", "checksum"}
    assert {k: v for k, v in after.items() if k not in changed} == \
        {k: v for k, v in before.items() if k not in changed}
    editor = memoir.load(model, char_tokenizer, directory)
    assert [r.status for r in editor.edits] == ["active", "active", "withdrawn"]
    assert editor.route([EDITS[2][0]])["gate"] == [False]
    assert target_accuracy(editor, *EDITS[0]) == 1.0
    editor.detach()
    assert cli_main(["edits", str(directory), "--withdraw", "2"]) == 2
    assert "not active" in capsys.readouterr().err
    assert cli_main(["edits", str(tmp_path / "nowhere")]) == 2


def test_cli_exports_the_active_edits(char_tokenizer, tmp_path):
    _, directory = _saved(char_tokenizer, tmp_path)
    assert cli_main(["edits", str(directory), "--withdraw", "0"]) == 0
    assert cli_main(["edits", str(directory), "--export", str(tmp_path / "out.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["target"]) for x in lines] == EDITS[1:]
