"""The layer holds the memory's state; each temporary activity is a context manager that restores."""

import pytest
import torch

import memoir
from memoir.layer import StopForward
from memoir.models import tiny_model

from .helpers import EDITS, UNRELATED, encode, tiny_config


@pytest.fixture
def editor(char_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))
    editor = memoir.attach(tiny_model("llama", vocab_size=len(char_tokenizer)), char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    return editor


def _logits(editor, char_tokenizer, text):
    with torch.no_grad():
        return editor.model(**encode(char_tokenizer, [text])).logits


def test_activities_nest_and_restore_after_errors(editor, char_tokenizer):
    layer = editor.layer
    edited = _logits(editor, char_tokenizer, EDITS[0][0])
    with editor.unedited():
        original = _logits(editor, char_tokenizer, EDITS[0][0])
        window = torch.ones(1, 3, dtype=torch.bool)
        with pytest.raises(RuntimeError, match="inside"), layer.training_pass(window) as session:
            assert not layer.routing and session.bits is None
            raise RuntimeError("inside")
        assert not layer.routing  # back to disabled, not forced to route
        assert torch.equal(_logits(editor, char_tokenizer, EDITS[0][0]), original)
        with layer.collecting() as keys, pytest.raises(StopForward):
            editor.model(**encode(char_tokenizer, ["abc"]))
        assert len(keys) == 1 and keys[0].shape == (1, layer.in_features)
    assert layer.routing and layer.call is None
    assert not torch.equal(edited, original)  # the edit changes its prompt's logits...
    assert torch.equal(_logits(editor, char_tokenizer, EDITS[0][0]), edited)  # ...again after the blocks


def test_an_edit_inside_unedited_leaves_the_memory_off_until_the_block_ends(editor, char_tokenizer):
    before = _logits(editor, char_tokenizer, EDITS[1][0])
    with editor.unedited():
        editor.edit(*EDITS[1])
        assert torch.equal(_logits(editor, char_tokenizer, EDITS[1][0]), before)  # still off
    assert not torch.equal(_logits(editor, char_tokenizer, EDITS[1][0]), before)


def test_tau_has_one_owner(editor):
    editor.layer.irr_threshold = 0.3  # what sweep_thresholds does while it scores
    assert editor.config.irr_threshold == 0.3
    editor.set_threshold(0.9)
    assert editor.layer.irr_threshold == editor.config.irr_threshold == 0.9
    editor.config = editor.config.replace(irr_threshold=0.5, n_iter=7)
    assert (editor.layer.irr_threshold, editor.config.n_iter) == (0.5, 7)
    with pytest.raises(ValueError, match="irr_threshold"):
        editor.set_threshold(1.5)
    with pytest.raises(ValueError, match="top_k cannot change"):
        editor.config = editor.config.replace(top_k=editor.config.top_k + 1)
    assert editor.layer.irr_threshold == 0.5
