"""Rehearsal: stored edits that a new edit overlaps are trained again in its batch, with their own masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memoir
from memoir.head_loss import row_mean_weights
from memoir.layer import TrainingPass
from memoir.models import tiny_model
from memoir.registry import EditRecord, EditRegistry
from memoir.rehearsal import choose_rehearsal
from memoir_kernels import pack_bits

from .helpers import EDITS, UNRELATED, target_accuracy, tiny_config

# Six later edits about the same subject: on this tiny model (D = 512, k = 250) they share most
# of the first edit's columns, and without rehearsal they overwrite it.
FIRST = ("Alice lives in", "Paris")
LATER = [("Alice lives near", "Rome"), ("Alice lived in", "Oslo"), ("Alice's home is in", "Kyiv"),
         ("Where does Alice live?", "Lima"), ("Alice now lives in", "Cairo"), ("Alice moved to", "Quito")]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


def _stream(tokenizer, edits, **changes):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    editor = memoir.attach(model, tokenizer, tiny_config(**changes))
    editor.fit_background(UNRELATED)
    results = [editor.edit(p, t) for p, t in edits]
    return editor, results


def test_rehearsal_keeps_an_edit_that_later_edits_overwrite(char_tokenizer):
    settings = dict(top_k=250, n_iter=30, irr_threshold=0.9)
    plain, _ = _stream(char_tokenizer, [FIRST] + LATER, rehearse=0, **settings)
    assert target_accuracy(plain, *FIRST) < 0.9  # the faithful recipe loses it
    kept, results = _stream(char_tokenizer, [FIRST] + LATER, rehearse=4, **settings)
    assert [r.rehearsed for r in results] == [0, 1, 2, 3, 4, 4, 4]
    assert [target_accuracy(kept, p, t) for p, t in [FIRST] + LATER] == [1.0] * 7


def test_nothing_to_rehearse_is_the_faithful_recipe_bit_for_bit(char_tokenizer):
    plain, plain_results = _stream(char_tokenizer, EDITS, rehearse=0)
    # A floor of 1.0 admits only masks equal to the new one, which are never rehearsed.
    none, none_results = _stream(char_tokenizer, EDITS, rehearse=4, rehearse_min_overlap=1.0)
    assert [r.rehearsed for r in none_results] == [0, 0, 0]
    assert torch.equal(plain.layer.memory, none.layer.memory)
    assert torch.equal(plain.layer.bank_bits, none.layer.bank_bits)
    assert [r.losses for r in plain_results] == [r.losses for r in none_results]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_rehearsed_rows_follow_on_both_paths(char_tokenizer, fast):
    editor, results = _stream(char_tokenizer, EDITS, rehearse=2, fast_edit=fast)
    assert [r.rehearsed for r in results] == [0, 1, 2]
    assert all(target_accuracy(editor, p, t) == 1.0 for p, t in EDITS)


def test_fast_and_plain_paths_agree_with_rehearsal(char_tokenizer):
    fast, fast_results = _stream(char_tokenizer, EDITS, rehearse=2, n_iter=15, fast_edit=True)
    plain, plain_results = _stream(char_tokenizer, EDITS, rehearse=2, n_iter=15, fast_edit=False)
    for a, b in zip(fast_results, plain_results, strict=True):
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.layer.memory, plain.layer.memory, rtol=1e-4, atol=1e-5)


def _record(index, prompt, row, status="active"):
    return EditRecord(index, prompt, "t", "2026-01-01T00:00:00Z", 1, 0.0, 0.0, row, True, status,
                      replaced_by=None)


def _overlaps(query: np.ndarray, bank: np.ndarray) -> list[int]:
    return [int(np.logical_and(query, row).sum()) for row in bank]


def test_choice_takes_the_most_overlapping_active_edits():
    rng = np.random.default_rng(0)
    dim, k, rows = 200, 60, 12
    bank = np.zeros((rows, dim), dtype=bool)
    for row in bank:
        row[rng.choice(dim, k, replace=False)] = True
    query = bank[3].copy()  # row 3 equals the new mask: never rehearsed
    query[np.flatnonzero(query)[:5]] = False
    query[np.flatnonzero(~query)[:5]] = True
    records = [_record(i, f"p{i}", i) for i in range(rows)]
    records[5] = _record(5, "p5", 5, status="withdrawn")
    records[7] = _record(7, "new prompt", 7)  # the same prompt as the new edit: it is being replaced
    registry = EditRegistry(records)
    overlap = _overlaps(query, bank)
    eligible = [i for i in range(rows) if i not in (5, 7) and overlap[i] < k]
    expected = sorted(eligible, key=lambda i: (-overlap[i], i))
    bank_bits, query_bits = pack_bits(torch.from_numpy(bank)), pack_bits(torch.from_numpy(query[None]))
    config = tiny_config(rehearse=4)
    chosen = choose_rehearsal(registry, bank_bits, query_bits, config, k, "new prompt")
    assert [r.index for r in chosen] == expected[:4]
    floor = sorted(overlap[i] for i in expected)[-2] / k  # admits exactly the best two
    chosen = choose_rehearsal(registry, bank_bits, query_bits, config.replace(rehearse_min_overlap=floor), k,
                              "new prompt")
    assert [r.index for r in chosen] == expected[:2]
    recent = choose_rehearsal(registry, bank_bits, query_bits, config.replace(rehearse_select="recent"), k,
                              "new prompt")
    assert [r.index for r in recent] == [11, 10, 9, 8]
    assert choose_rehearsal(registry, bank_bits, query_bits, config.replace(rehearse=0), k, "new prompt") == []


def test_row_weights_weight_each_rows_mean_loss():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 11), torch.randint(0, 11, (7,))
    rows = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    weights = torch.tensor([1.0, 1.0, 0.5, 2.0])
    token = F.cross_entropy(logits, labels, reduction="none")
    row_means = [token[rows == r].mean() for r in range(4)]
    expected = sum(w * m for w, m in zip(weights, row_means, strict=True)) / weights.sum()
    got = (row_mean_weights(rows, 4, torch.float32, weights) * token).sum()
    torch.testing.assert_close(got, expected)


def test_training_masks_give_rehearsed_rows_their_stored_masks(char_tokenizer):
    editor, _ = _stream(char_tokenizer, [])
    dim = editor.layer.in_features
    own = torch.zeros(1, dim, dtype=torch.bool)
    own[0, :5] = True
    stored = torch.zeros(2, dim, dtype=torch.bool)
    stored[0, 10:20] = True
    stored[1, -3:] = True
    session = TrainingPass(pack_bits(stored))
    session.bits = pack_bits(own)
    assert torch.equal(session.masks(5, dim), torch.cat([own.expand(3, -1), stored]))
    alone = TrainingPass()
    alone.bits = pack_bits(own)
    assert torch.equal(alone.masks(5, dim), own)


def test_easyedit_keeps_the_reference_recipe_unless_the_yaml_asks():
    from memoir.easyedit import MEMOIRHyperParams

    keys = dict(alg_name="MEMOIR", model_name="m", device=0, inner_params=["model.layers.1.mlp.down_proj.weight"],
                edit_lr=1.0, n_iter=30, objective_optimization="only_label")
    assert MEMOIRHyperParams.from_hparams(config=keys).to_memoir_config().rehearse == 0
    chosen = MEMOIRHyperParams.from_hparams(config={**keys, "rehearse": 4, "rehearse_weight": 0.5})
    assert (chosen.to_memoir_config().rehearse, chosen.to_memoir_config().rehearse_weight) == (4, 0.5)
    with pytest.raises(ValueError, match="rehearse"):
        MEMOIRHyperParams.from_hparams(config={**keys, "rehearse": -1}).to_memoir_config()
