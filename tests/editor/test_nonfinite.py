"""Nothing non-finite is ever stored: a NaN/inf edit is rolled back with an error naming the cause."""

import math

import pytest
import torch

import memoir
from memoir import MemoirConfig, NonFiniteEditError
from memoir.models import tiny_model

from .helpers import EDITS, UNRELATED, target_accuracy, tiny_config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


def _state(editor):
    layer = editor.layer
    return (layer.memory.detach().clone(), layer.bank_bits.clone(), editor.registry.to_json(), editor.num_edits)


def _assert_same(before, after):
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2:] == after[2:]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_non_finite_activations_roll_the_edit_back(char_tokenizer, fast):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config(fast_edit=fast))
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    before = _state(editor)
    weight = model.model.layers[0].mlp.up_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")  # upstream of the edited layer
    with pytest.raises(NonFiniteEditError, match="activations"):
        editor.edit(*EDITS[1])
    _assert_same(before, _state(editor))
    with torch.no_grad():
        weight.copy_(saved)  # the model repaired: the earlier edit is intact
    assert target_accuracy(editor, *EDITS[0]) == 1.0
    assert torch.isfinite(editor.layer.memory).all()


def test_a_diverging_step_size_is_named(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config(lr=1e38, grad_clip=0.0, rehearse=0))
    editor.fit_background(UNRELATED)
    before = _state(editor)
    with pytest.raises(NonFiniteEditError, match="step size is too large"):
        editor.edit(*EDITS[0])
    _assert_same(before, _state(editor))


@pytest.mark.parametrize("field,value", [
    ("lr", math.inf), ("lr", float("nan")), ("lr", "1.0"), ("top_k", True), ("n_iter", 2.5),
    ("irr_threshold", "0.5"), ("weight_decay", math.inf), ("grad_clip", math.nan), ("rehearse", True),
    ("rehearse_weight", math.inf), ("early_stop_loss", math.nan), ("num_background", 1.5),
    ("context_lengths", "5"),
])
def test_config_rejects_non_finite_and_mistyped_values(field, value):
    with pytest.raises(ValueError, match=field):
        MemoirConfig(**{field: value})


def test_route_refuses_misuse(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    with pytest.raises(TypeError, match="list of prompts"):
        editor.route(EDITS[0][0])
    assert editor.route([]) == {"index": [], "overlap": [], "gate": []}
    assert editor.route([EDITS[0][0]])["gate"] == [True]
    editor.detach()
    with pytest.raises(RuntimeError, match="detached"):
        editor.route([EDITS[0][0]])


def test_resume_refuses_an_editor_holding_other_edits(char_tokenizer, tmp_path):
    from memoir.persistence import CONFIG_FILE

    requests = [{"prompt": p, "target": t} for p, t in EDITS]
    first = memoir.attach(tiny_model("llama", vocab_size=len(char_tokenizer)), char_tokenizer, tiny_config())
    first.fit_background(UNRELATED)
    first.edit_many(requests[:2], progress=False, checkpoint_dir=tmp_path / "ckpt")
    other = memoir.attach(tiny_model("llama", vocab_size=len(char_tokenizer)), char_tokenizer, tiny_config())
    other.fit_background(UNRELATED)
    other.edit("Carol plays the", "cello")
    before = _state(other)
    with pytest.raises(ValueError, match="not the start of the checkpoint"):
        other.edit_many(requests, progress=False, checkpoint_dir=tmp_path / "ckpt")
    _assert_same(before, _state(other))
    # A stale temporary file of a killed write is gone after the next write.
    stale = tmp_path / "ckpt" / f".{CONFIG_FILE}.killed"
    stale.write_text("partial")
    first.edit_many(requests, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert not stale.exists()
    assert [r.prompt for r in first.edits] == [p for p, _ in EDITS]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_edit_longer_than_the_model_is_refused_before_anything_runs(char_tokenizer, arch):
    model = tiny_model(arch, vocab_size=len(char_tokenizer))  # 128 positions
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    before = _state(editor)
    with pytest.raises(ValueError, match=r"is 1\d\d tokens, more than the model's 128 positions"):
        editor.edit("x" * 110, "a long answer")  # 125 tokens alone; not with a context prefix in front
    _assert_same(before, _state(editor))


def test_a_target_that_is_not_an_mlp_projection_is_refused_for_the_fast_path(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    attention = "model.layers.1.self_attn.o_proj"
    with pytest.raises(ValueError, match="not the MLP output projection.*fast_edit=False"):
        memoir.attach(model, char_tokenizer, tiny_config(target_module=attention))
    assert not hasattr(model, "_memoir_editor") and not model._forward_pre_hooks
    editor = memoir.attach(model, char_tokenizer, tiny_config(target_module=attention, fast_edit=False))
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    assert target_accuracy(editor, *EDITS[0]) == 1.0
