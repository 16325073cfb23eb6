"""Bad inputs raise clear errors and leave the editor and model unchanged."""

import json

import pytest
import torch

import memoir
from memoir import MemoirConfig
from memoir.layer import MemoirLayer
from memoir.models import tiny_model

from .helpers import EDITS, UNRELATED, tiny_config


@pytest.fixture()
def editor(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config(n_iter=5))
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    return editor


def _state(editor):
    return editor.layer.memory.clone(), editor.layer.bank_bits.clone(), editor.num_edits


def _unchanged(editor, state):
    memory, bank, edits = state
    return torch.equal(editor.layer.memory, memory) and torch.equal(editor.layer.bank_bits, bank) and \
        editor.num_edits == edits


@pytest.mark.parametrize("prompt,target,error,match", [
    pytest.param("", "x", ValueError, "prompt must not be empty", id="empty-prompt"),
    pytest.param("Hi", "   ", ValueError, "target must not be empty", id="blank-target"),
    pytest.param(3, "x", TypeError, "prompt must be a str", id="int-prompt"),
    pytest.param("Hi", None, TypeError, "target must be a str", id="none-target"),
])
def test_bad_edit_raises_and_changes_nothing(editor, prompt, target, error, match):
    state = _state(editor)
    with pytest.raises(error, match=match):
        editor.edit(prompt, target)
    assert _unchanged(editor, state)


def test_edit_many_validates_everything_first(editor):
    state = _state(editor)
    with pytest.raises(ValueError, match=r"request 1"):
        editor.edit_many([{"prompt": "ok", "target": "fine"}, {"prompt": "no target"}], progress=False)
    with pytest.raises(TypeError, match="dict"):
        editor.edit_many(["not a dict"], progress=False)
    assert _unchanged(editor, state)


def test_interrupted_edit_restores_the_memory(editor, monkeypatch):
    state = _state(editor)
    import memoir.editor as editor_module

    def explode(*args, **kwargs):
        editor.layer.memory.data.add_(1.0)  # a half-done update...
        raise KeyboardInterrupt  # ...then Ctrl-C

    monkeypatch.setattr(editor_module, "optimise_edit", explode)
    with pytest.raises(KeyboardInterrupt):
        editor.edit("New prompt", "value")
    assert _unchanged(editor, state)


def test_missing_layer_name(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    with pytest.raises(ValueError, match="no module 'model.layers.9.mlp.down_proj'"):
        memoir.attach(model, char_tokenizer, tiny_config(target_module="model.layers.9.mlp.down_proj"))
    assert not hasattr(model, "_memoir_editor")


def test_non_linear_target(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    with pytest.raises(TypeError, match="Linear or Conv1D"):
        memoir.attach(model, char_tokenizer, tiny_config(target_module="model.layers.1.mlp"))
    assert not any(isinstance(m, MemoirLayer) for m in model.modules())


def test_attach_twice(editor, char_tokenizer):
    with pytest.raises(RuntimeError, match="already"):
        memoir.attach(editor.model, char_tokenizer)


def test_bad_config_values():
    with pytest.raises(ValueError, match="irr_threshold"):
        MemoirConfig(irr_threshold=1.5)
    with pytest.raises(ValueError, match="key_aggregation"):
        MemoirConfig(key_aggregation="max")


def test_memory_from_another_model_is_refused(editor, char_tokenizer, tmp_path):
    editor.save(tmp_path)
    other = tiny_model("llama", seed=99, vocab_size=len(char_tokenizer))
    with pytest.raises(ValueError, match="fingerprint"):
        memoir.load(other, char_tokenizer, tmp_path)
    assert not any(isinstance(m, MemoirLayer) for m in other.modules())
    assert not hasattr(other, "_memoir_editor") and not other._forward_pre_hooks


def test_corrupted_memory_file_is_refused(editor, char_tokenizer, tmp_path):
    editor.save(tmp_path)
    path = tmp_path / "memoir_memory.safetensors"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    fresh = tiny_model("llama", vocab_size=len(char_tokenizer))
    with pytest.raises(ValueError, match="corrupted"):
        memoir.load(fresh, char_tokenizer, tmp_path)
    assert not any(isinstance(m, MemoirLayer) for m in fresh.modules())


def test_missing_files_and_bad_config(char_tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    with pytest.raises(FileNotFoundError, match="memoir_memory.safetensors is missing"):
        memoir.load(model, char_tokenizer, tmp_path)
    (tmp_path / "memoir_config.json").write_text(json.dumps({"top_k": -1}))
    (tmp_path / "memoir_memory.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="corrupted"):
        memoir.load(model, char_tokenizer, tmp_path)
    assert not hasattr(model, "_memoir_editor")


def test_detached_editor_refuses_work(editor):
    editor.detach()
    with pytest.raises(RuntimeError, match="detached"):
        editor.edit("a", "b")


def test_saved_files_get_the_umask_permissions_not_mkstemps_0600(editor, tmp_path):
    """Files written through a temporary file must not end up private to the user."""
    import os

    old = os.umask(0o022)
    try:
        editor.save(tmp_path)
    finally:
        os.umask(old)
    for name in ("memoir_config.json", "memoir_memory.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
