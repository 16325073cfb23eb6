"""When an edit stops: the loss threshold and the per-step change, from the config or the preset."""

import memoir
from memoir.models import tiny_model

from .helpers import EDITS, UNRELATED, tiny_config


def _losses(tokenizer, **changes) -> list[float]:
    model = tiny_model("llama", vocab_size=len(tokenizer))
    editor = memoir.attach(model, tokenizer, tiny_config(**changes))
    editor.fit_background(UNRELATED)
    return editor.edit(*EDITS[0]).losses


def _first_stop(losses: list[float], loss: float, delta: float) -> int | None:
    """Number of losses recorded when the rule first holds (the stopping step records its loss)."""
    for step in range(1, len(losses)):
        if losses[step] <= loss and abs(losses[step] - losses[step - 1]) <= delta:
            return step + 1
    return None


def test_edit_stops_at_the_first_step_that_meets_both_conditions(char_tokenizer):
    full = _losses(char_tokenizer, n_iter=60, early_stop_loss=0.0, early_stop_delta=0.0)
    assert len(full) == 60  # a zero threshold never stops
    loose = full[10]  # a loss the run passes well before its end
    expected = _first_stop(full, loose, loose)
    assert expected is not None and expected < 60
    stopped = _losses(char_tokenizer, n_iter=60, early_stop_loss=loose, early_stop_delta=loose)
    assert len(stopped) == expected
    assert stopped == full[:expected]  # the same steps until then


def test_a_tight_delta_keeps_training_past_the_loss_threshold(char_tokenizer):
    """The reference's rule (a change of at most 1e-4 too) runs longer than the loss alone would."""
    full = _losses(char_tokenizer, n_iter=60, early_stop_loss=0.0, early_stop_delta=0.0)
    loose = full[10]
    tight = _losses(char_tokenizer, n_iter=60, early_stop_loss=loose, early_stop_delta=1e-7)
    assert len(tight) > _first_stop(full, loose, loose)


def test_unset_stop_comes_from_the_preset(char_tokenizer):
    from memoir.architectures import resolve_config

    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    config = resolve_config(model, memoir.MemoirConfig())
    assert (config.early_stop_loss, config.early_stop_delta) == (0.02, 1e-4)  # the reference's rule
    explicit = resolve_config(model, memoir.MemoirConfig(early_stop_loss=0.1, early_stop_delta=0.0))
    assert (explicit.early_stop_loss, explicit.early_stop_delta) == (0.1, 0.0)
