"""The EasyEdit drop-in (memoir.easyedit): hyper-parameter files, apply_memoir_to_model, the editor
object, background features, registration, and EasyEdit's sequential protocol on SmolLM2."""

import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import memoir
from memoir.easyedit import (
    MEMOIR,
    MEMOIRHyperParams,
    apply_memoir_to_model,
    compute_background_features,
    convert_background_features,
    load_background_features,
    register,
    save_background_features,
    tokenize,
)
from memoir.layer import MemoirLayer
from memoir.models import tiny_model

from .helpers import EDITS, UNRELATED, tiny_config

HPARAMS_DIR = Path(__file__).resolve().parents[2] / "hparams" / "MEMOIR"
SHIPPED = ("llama3-8b", "mistral-7b", "llama-7b", "gpt-j-6B", "smollm2-135m")


def tiny_hparams(**changes) -> MEMOIRHyperParams:
    config = dict(alg_name="MEMOIR", model_name="tiny-llama", device=0, edit_lr=10.0, n_iter=100,
                  objective_optimization="only_label", inner_params=["model.layers[3].mlp.down_proj.weight"],
                  top_k=40, irr_threshold=0.75)
    return MEMOIRHyperParams.from_hparams(config={**config, **changes})


# ------------------------------------------------------------------------------------------ hparams
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_hparams_load_with_and_without_suffix(name):
    with_suffix = MEMOIRHyperParams.from_hparams(HPARAMS_DIR / f"{name}.yaml")
    without = MEMOIRHyperParams.from_hparams(str(HPARAMS_DIR / name))
    assert with_suffix == without
    assert with_suffix.alg_name == "MEMOIR" and with_suffix.objective_optimization == "only_label"
    assert MEMOIRHyperParams.from_hparams(name) == with_suffix  # bare name: looked up in hparams/MEMOIR
    config = with_suffix.to_memoir_config()
    assert config.target_module == with_suffix.target_module and config.top_k == with_suffix.top_k


def test_shipped_hparams_match_the_presets():
    from memoir.architectures import _PRESETS

    expected = {"llama3-8b": ("llama", 32, 4096, 14336), "mistral-7b": ("mistral", 32, 4096, 14336),
                "gpt-j-6B": ("gptj", 28, 4096, 16384), "smollm2-135m": ("llama", 30, 576, 1536)}
    for name, key in expected.items():
        hparams, preset = MEMOIRHyperParams.from_hparams(name), _PRESETS[key]
        assert f".{preset.layer}." in hparams.target_module, name
        assert (hparams.top_k, hparams.irr_threshold, hparams.n_iter, hparams.edit_lr) == \
            (preset.top_k, preset.irr_threshold, preset.n_iter, preset.lr), name
        assert hparams.weight_decay in (None, preset.weight_decay), name
        # The reference models' yaml keep the reference recipe; SmolLM2's ships the measured rehearsal.
        assert hparams.rehearse == (preset.rehearse if name == "smollm2-135m" else 0), name
        assert (hparams.answer_end, hparams.train_chat) == (
            (preset.answer_end, preset.train_chat) if name == "smollm2-135m" else ("none", False)), name
        # The reference stops at loss <= 0.02 once a step changes it by <= 1e-4.
        assert (hparams.early_stop_loss, hparams.early_stop_delta) == (
            (preset.early_stop_loss, preset.early_stop_delta) if name == "smollm2-135m" else (0.02, 1e-4)), name
    llama2 = MEMOIRHyperParams.from_hparams("llama-7b")  # proportional rule, no measured preset
    assert llama2.target_module == "model.layers.27.mlp.down_proj" and llama2.top_k == round(0.2857 * 11008)


def test_inner_params_become_a_module_name():
    assert tiny_hparams().target_module == "model.layers.3.mlp.down_proj"
    gptj = tiny_hparams(inner_params=["transformer.h[21].mlp.fc_out.weight"])
    assert gptj.target_module == "transformer.h.21.mlp.fc_out"
    assert tiny_hparams(inner_params="model.layers.1.mlp.down_proj").target_module == "model.layers.1.mlp.down_proj"


def test_scientific_notation_strings_are_numbers():
    hparams = tiny_hparams(edit_lr="1e-1", weight_decay="2e-6")
    assert hparams.edit_lr == pytest.approx(0.1) and hparams.weight_decay == pytest.approx(2e-6)


def test_yaml_errors_are_clear(tmp_path):
    path = tmp_path / "bad.yaml"
    base = (HPARAMS_DIR / "smollm2-135m.yaml").read_text()
    path.write_text(base.replace('alg_name: "MEMOIR"', 'alg_name: "WISE"'))
    with pytest.raises(ValueError, match="alg_name is 'WISE'"):
        MEMOIRHyperParams.from_hparams(path)
    path.write_text(base + "\nmask_ratio: 0.2\nact_margin: [1, 2]\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['act_margin', 'mask_ratio'\]"):
        MEMOIRHyperParams.from_hparams(str(path)[:-5])
    path.write_text(re.sub(r"(?m)^n_iter:.*\n", "", base))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['n_iter'\]"):
        MEMOIRHyperParams.from_hparams(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        MEMOIRHyperParams.from_hparams(path)
    with pytest.raises(FileNotFoundError, match="no hyper-parameter file"):
        MEMOIRHyperParams.from_hparams(tmp_path / "absent")


@pytest.mark.parametrize("changes,match", [
    pytest.param(dict(alg_name="ROME"), "alg_name is 'ROME', expected 'MEMOIR'", id="alg"),
    pytest.param(dict(n_iter=0), "n_iter must be a positive int", id="n_iter"),
    pytest.param(dict(edit_lr="fast"), "edit_lr must be a number", id="lr"),
    pytest.param(dict(irr_threshold=1.5), r"irr_threshold must be in \[0, 1\]", id="tau"),
    pytest.param(dict(prompt_feature_agg="max"), "prompt_feature_agg must be one of", id="agg"),
    pytest.param(dict(objective_optimization="target_new"), "objective_optimization 'target_new'", id="objective"),
    pytest.param(dict(inner_params=[]), "inner_params must be a non-empty list", id="inner"),
    pytest.param(dict(batch_size=4), "batch_size must be 1", id="batch"),
    pytest.param(dict(RUN_SAVE_BACKGROUND_FEATURES=True), "needs dir_to_save_background_features", id="save"),
])
def test_bad_values_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_hparams(**changes)


# ------------------------------------------------------------------------------------------ tiny model
@pytest.fixture()
def tiny(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    return model, char_tokenizer


def _requests():
    return [{"prompt": p, "target_new": t, "ground_truth": "<|endoftext|>", "portability": {}, "locality": {},
             "loc_prompt": UNRELATED[i % len(UNRELATED)], "rephrase_prompt": p.lower()} for i, (p, t) in enumerate(EDITS)]


def _left_padded(tok, prompts, targets):
    """EasyEdit-style input: left padding, and per row the index of its last prompt token."""
    tok.padding_side = "left"
    batch = tok([f"{p} {t}" for p, t in zip(prompts, targets, strict=True)], return_tensors="pt", padding=True)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    pads = (batch["attention_mask"] == 0).sum(dim=1)
    tok.padding_side = "right"
    return batch, pads + torch.tensor(lengths) - 1


def _target_accuracy(logits, batch, last):
    accuracies = []
    predicted = logits.argmax(dim=-1)
    for row in range(logits.shape[0]):
        start = int(last[row]) + 1
        want = batch["input_ids"][row, start:]
        got = predicted[row, start - 1 : -1]
        accuracies.append(float((got == want).float().mean()))
    return accuracies


def test_sequential_editing_weights_copy_and_reset(tiny):
    model, tok = tiny
    hparams = tiny_hparams()
    original_module = model.get_submodule(hparams.target_module)
    probe = tok(UNRELATED + [p for p, _ in EDITS], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**probe).logits
    # A memory attached beforehand is reused (here: the tiny models' short context prefixes).
    memoir.attach(model, tok, tiny_config(target_module=hparams.target_module)).fit_background(UNRELATED)
    for request in _requests():  # EasyEdit's sequential loop: one request per call
        editor, weights_copy = apply_memoir_to_model(model, tok, [request], hparams, copy=False,
                                                     return_orig_weights=True, keep_original_weight=False,
                                                     train_ds=None)
    layer = editor.get_adapter_layer()
    assert isinstance(layer, MemoirLayer) and layer.num_masks == len(EDITS)
    assert editor.memoir_editor.num_edits == len(EDITS)  # the memory persisted across calls

    prompts, targets = [p for p, _ in EDITS], [t for _, t in EDITS]
    batch, last = _left_padded(tok, prompts, targets)
    with torch.no_grad():
        out = editor(**batch, last_prompt_token_loc_inference=last)
        same = editor.memoir_editor(**batch, prompt_lengths=(batch["attention_mask"].cumsum(1).gather(1, last[:, None])
                                                            .squeeze(1)))
    assert torch.equal(out.logits, same.logits)
    assert _target_accuracy(out.logits, batch, last) == [1.0] * len(EDITS)  # every row routed on its own
    assert editor.memoir_editor.last_decision.index.tolist() == [0, 1, 2]
    assert editor.config is hparams and editor.device == model.device  # model attributes pass through

    weights_copy()
    assert model.get_submodule(hparams.target_module) is original_module
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, before)  # bit for bit the original model
    editor.reset_layer()  # idempotent
    with pytest.raises(RuntimeError, match="reset_layer"):
        editor(**batch)


def test_weights_copy_items_restores_for_easyedits_generic_path(tiny):
    model, tok = tiny
    hparams = tiny_hparams(n_iter=3)
    with pytest.warns(UserWarning, match="dir_background_features is not set"):
        _, weights_copy = apply_memoir_to_model(model, tok, _requests()[:1], hparams)
    assert isinstance(model.get_submodule(hparams.target_module), MemoirLayer)
    assert list(weights_copy.items()) == []  # EasyEdit: for k, v in weights_copy.items(): ...
    assert isinstance(model.get_submodule(hparams.target_module), torch.nn.Linear)


def test_empty_memory_is_the_original_model_and_generate_works(tiny):
    model, tok = tiny
    batch = tok(UNRELATED, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits
    editor = MEMOIR(tiny_hparams(), model, tokenizer=tok)
    with torch.no_grad():
        assert torch.equal(editor(**batch, last_prompt_token_loc_inference=[2, 2, 2]).logits, before)
    inner = editor.memoir_editor
    inner.fit_background(inner.ensure_context_prefixes())  # this char-level tiny model trains well with it
    editor.edit(tiny_hparams(), requests=_requests()[:1])
    one = tok([EDITS[0][0]], return_tensors="pt")
    out = editor.generate(**one, max_new_tokens=len(EDITS[0][1]) + 1, do_sample=False,
                          last_prompt_token_loc_inference=[one["input_ids"].shape[1] - 1])
    assert tok.decode(out[0, one["input_ids"].shape[1]:]).strip().startswith(EDITS[0][1])
    editor.reset_layer()


def test_no_background_file_takes_mu_from_the_bundled_sentences(tiny):
    from memoir.background import GENERIC_SENTENCES

    model, tok = tiny
    editor = MEMOIR(tiny_hparams(n_iter=1), model, tokenizer=tok)
    try:
        editor.edit(tiny_hparams(n_iter=1), requests=_requests()[:1])
        layer = editor.memoir_editor.layer
        bundled = editor.memoir_editor.collect_keys(list(GENERIC_SENTENCES[: tiny_hparams().num_background]))
        assert layer.has_background and torch.equal(layer.background_mean, bundled.mean(dim=0))
    finally:
        editor.reset_layer()


def test_edit_from_reference_tokens(tiny):
    model, tok = tiny
    hparams = tiny_hparams(n_iter=2)
    tokens = tokenize(_requests()[:1], tok, hparams)
    assert tokens["input_ids"].shape[0] == 2  # the edit row and its loc_prompt row
    assert (tokens["labels"][1] == -100).all()
    assert tok.decode(tokens["labels"][0][tokens["labels"][0] != -100]).strip() == EDITS[0][1]
    editor = MEMOIR(hparams, model, tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = editor.edit(config=hparams, tokens=tokens, act_mask=None, deact_mask=None)
    assert (results[0].prompt, results[0].target) == EDITS[0]
    with pytest.raises(TypeError, match="unexpected arguments"):
        editor.edit(hparams, tokens, something=1)
    editor.reset_layer()


def test_bad_inputs_raise_clearly(tiny):
    model, tok = tiny
    hparams = tiny_hparams(n_iter=2)
    with pytest.raises(ValueError, match="'target_new'"):
        apply_memoir_to_model(model, tok, [{"prompt": "Hi"}], hparams)
    with pytest.raises(ValueError, match="must not be empty"):
        apply_memoir_to_model(model, tok, [{"prompt": "Hi", "target_new": " "}], hparams)
    with pytest.raises(TypeError, match="MEMOIRHyperParams"):
        apply_memoir_to_model(model, tok, _requests(), {"alg_name": "MEMOIR"})
    with pytest.raises(TypeError, match="tokenizer"):
        MEMOIR(hparams, model)
    assert not isinstance(model.get_submodule(hparams.target_module), MemoirLayer)  # nothing attached
    editor = MEMOIR(hparams, model, tokenizer=tok)
    batch = tok(UNRELATED, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match="3 entries for a batch of"):
        editor(**tok(UNRELATED[:2], return_tensors="pt", padding=True), last_prompt_token_loc_inference=[1, 2, 3])
    with pytest.raises(ValueError, match=rf"must be in \[0, {width - 1}\]"):
        editor(**batch, last_prompt_token_loc_inference=[width, 1, 1])
    with pytest.raises(TypeError, match="integer"):
        editor(**batch, last_prompt_token_loc_inference=[1.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="top_k=40"):
        MEMOIR(tiny_hparams(top_k=20), model, tokenizer=tok)  # a different memory on the same model
    retuned = MEMOIR(tiny_hparams(irr_threshold=0.5, n_iter=7), model, tokenizer=tok)  # tau, n_iter may change
    assert retuned.get_adapter_layer().irr_threshold == 0.5 and retuned.memoir_editor.config.n_iter == 7
    editor.reset_layer()


# ------------------------------------------------------------------------------------------ background
def test_background_features_file_sets_mu(tiny, tmp_path):
    model, tok = tiny
    hparams = tiny_hparams(n_iter=2)
    features = compute_background_features(model, tok, UNRELATED, hparams)
    assert features.shape == (len(UNRELATED), 512)
    assert not isinstance(model.get_submodule(hparams.target_module), MemoirLayer)  # left unchanged
    path = tmp_path / "bg.safetensors"
    save_background_features(features, path)
    assert torch.equal(load_background_features(path, 512), features)
    with pytest.raises(ValueError, match="D = 512, the edited layer has 100"):
        load_background_features(path, 100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MEMOIR(tiny_hparams(dir_background_features=str(tmp_path / "absent.safetensors")), model, tokenizer=tok)
    assert not isinstance(model.get_submodule(hparams.target_module), MemoirLayer)  # a bad file attaches nothing

    editor = MEMOIR(tiny_hparams(n_iter=2, dir_background_features=str(path)), model, tokenizer=tok)
    reference = memoir.attach(tiny_model("llama", vocab_size=len(tok)), tok, editor.memoir_editor.config)
    reference.fit_background(UNRELATED)
    assert torch.equal(editor.get_adapter_layer().background_mean, reference.layer.background_mean)
    editor.reset_layer()


def test_pickle_files_are_refused_and_converted_safely(tmp_path):
    features = torch.randn(5, 16)
    pt = tmp_path / "reference.pt"
    torch.save(features, pt)
    with pytest.raises(ValueError, match="convert_background_features.py"):
        load_background_features(pt)
    converted = convert_background_features(pt, tmp_path / "converted.safetensors")
    assert torch.equal(converted, features)
    assert torch.equal(load_background_features(tmp_path / "converted.safetensors", 16), features)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        convert_background_features(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()


def test_converter_script(tmp_path):
    import subprocess

    torch.save(torch.randn(3, 8), tmp_path / "f.pt")
    script = Path(__file__).resolve().parents[2] / "tools" / "convert_background_features.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "f.pt"), str(tmp_path / "f.safetensors")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "3 x 8" in done.stdout and (tmp_path / "f.safetensors").is_file()


def test_run_save_background_features_mode(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "saved" / "bg.safetensors"
    hparams = tiny_hparams(RUN_SAVE_BACKGROUND_FEATURES=True, dir_to_save_background_features=str(out))
    for request in _requests():
        editor, _ = apply_memoir_to_model(model, tok, [request], hparams)
    assert editor.memoir_editor.num_edits == 0  # no edit in this mode
    saved = load_background_features(out, 512)
    expected = compute_background_features(model, tok, [r["loc_prompt"] for r in _requests()])
    assert saved.shape == expected.shape and torch.allclose(saved, expected, atol=1e-5)  # one at a time vs batched
    editor.reset_layer()


# ------------------------------------------------------------------------------------------ registry
def test_register_adds_memoir_to_easyedit(monkeypatch):
    package, util, alg_dict = (types.ModuleType(n) for n in ("easyeditor", "easyeditor.util",
                                                                "easyeditor.util.alg_dict"))
    alg_dict.ALG_DICT = {"ROME": object()}
    package.util, util.alg_dict = util, alg_dict
    for name, module in (("easyeditor", package), ("easyeditor.util", util), ("easyeditor.util.alg_dict", alg_dict)):
        monkeypatch.setitem(sys.modules, name, module)
    register()
    assert alg_dict.ALG_DICT["MEMOIR"] is apply_memoir_to_model and "ROME" in alg_dict.ALG_DICT
    assert package.MEMOIRHyperParams is MEMOIRHyperParams


def test_register_without_easyedit_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyeditor", None)
    with pytest.raises(ImportError, match="needs EasyEdit"):
        register()


# ------------------------------------------------------------------------------------------ SmolLM2
# EasyEdit's sequential protocol for MEMOIR, scored as DESIGN.md section 4 defines it: every record
# is scored on the raw model, all records are applied one request per apply_memoir_to_model call,
# then every record is scored on the returned editor. A score reads one row, `question + ' ' +
# answer`, teacher forced: the argmax at the position before each answer token is the model's guess
# for that token. Rel / Gen = share of guesses equal to the answer's tokens; Loc = share of guesses
# equal to the unedited model's guesses. As in the harness, the answer starts after as many tokens
# as the question has when tokenised alone (cut at max_length), and the editor is told that the
# question ends one position earlier.
def _question_and_answer_row(tok, hparams, question, answer):
    """The tokenised row and the position of its first answer token."""
    text = f"{question} {answer}"
    row = tok([text], truncation=True, max_length=max(hparams.max_length, len(tok.encode(text)) + 1),
              return_tensors="pt")
    question_ids = tok(question, truncation=True, max_length=hparams.max_length)["input_ids"]
    return row, len([i for i in question_ids if i != tok.pad_token_id])


def _guesses_and_answer(scored, tok, hparams, question, answer):
    """The model's teacher-forced guess for each answer token, and the answer tokens themselves."""
    row, first = _question_and_answer_row(tok, hparams, question, answer)
    routing = {"last_prompt_token_loc_inference": torch.tensor([first - 1])} if isinstance(scored, MEMOIR) else {}
    with torch.no_grad():
        best = scored(**row, **routing).logits[0].argmax(dim=-1)
    tokens = row["input_ids"][0]
    answer_positions = range(first, tokens.shape[0])
    return [int(best[p - 1]) for p in answer_positions], [int(tokens[p]) for p in answer_positions]


def _share_equal(left, right):
    assert len(left) == len(right) > 0
    return sum(a == b for a, b in zip(left, right, strict=True)) / len(left)


def _target_share(scored, tok, hparams, question, answer):
    return _share_equal(*_guesses_and_answer(scored, tok, hparams, question, answer))


def _protocol_scores(scored, tok, hparams, record):
    """Rel and Gen of one record, and the guesses on its unrelated question (for Loc)."""
    return {"rel": _target_share(scored, tok, hparams, record["src"], record["alt"]),
            "gen": _target_share(scored, tok, hparams, record["rephrase"], record["alt"]),
            "loc_guesses": _guesses_and_answer(scored, tok, hparams, record["loc"], record["loc_ans"])[0]}


def _easyedit_sequential(model, tok, hparams, records, loc_prompts):
    """Runs the protocol; returns the means, per-record Rel / Gen / Loc, the editor and its restorer."""
    before = [_protocol_scores(model, tok, hparams, record) for record in records]
    for i, record in enumerate(records):  # the request shape EasyEdit hands to apply_memoir_to_model
        request = {"prompt": record["src"], "target_new": record["alt"], "ground_truth": "<|endoftext|>",
                   "rephrase_prompt": record["rephrase"], "loc_prompt": loc_prompts[i], "portability": {},
                   "locality": {"neighborhood": {"prompt": record["loc"], "ground_truth": record["loc_ans"]}}}
        editor, restore = apply_memoir_to_model(model, tok, [request], hparams, copy=False, return_orig_weights=True,
                                                keep_original_weight=False, train_ds=None)
    after = [_protocol_scores(editor, tok, hparams, record) for record in records]
    per_record = {"rel": [scores["rel"] for scores in after], "gen": [scores["gen"] for scores in after],
                  "loc": [_share_equal(edited["loc_guesses"], unedited["loc_guesses"])
                          for edited, unedited in zip(after, before, strict=True)]}
    summary = {name: float(np.mean(values)) for name, values in per_record.items()}
    summary |= {"pre_rel": float(np.mean([scores["rel"] for scores in before])),
                "pre_gen": float(np.mean([scores["gen"] for scores in before])), "per_record": per_record}
    return summary, editor, restore


@pytest.mark.slow
def test_easyedit_protocol_matches_memoir_eval_on_smollm2(smollm2, zsre_records, tmp_path):
    from memoir.evaluation import background_sentences, edit_records, evaluate_sequential

    model, tok = smollm2
    n_iter = 8  # fewer steps than the preset keeps this test short; the same on both sides
    records, _ = edit_records(zsre_records, 3)
    background = background_sentences(zsre_records[1000:2000], 100)

    reference = memoir.attach(model, tok, memoir.MemoirConfig(n_iter=n_iter))
    try:
        expected = evaluate_sequential(reference, records, background, progress=False)
        expected_config = reference.config
    finally:
        reference.detach()

    hparams = MEMOIRHyperParams.from_hparams("smollm2-135m")
    hparams.n_iter = n_iter
    hparams.dir_background_features = str(tmp_path / "smollm2_background.safetensors")
    save_background_features(compute_background_features(model, tok, background, hparams),
                             hparams.dir_background_features)
    loc_prompts = [f"{r['loc']} {r['loc_ans']}" for r in zsre_records[1000:2000]]
    got, editor, weights_copy = _easyedit_sequential(model, tok, hparams, records, loc_prompts)
    try:
        assert editor.memoir_editor.config == expected_config
        assert editor.memoir_editor.num_edits == len(records)
        # Token accuracies are multiples of 1/n: 1e-6 only absorbs float32 vs float64 averaging.
        for key in ("rel", "gen", "loc", "pre_rel", "pre_gen"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (key, got, expected)
        for key in ("rel", "gen", "loc"):
            assert got["per_record"][key] == pytest.approx(expected["per_record"][key], abs=1e-6), key
    finally:
        weights_copy()
    assert not isinstance(model.get_submodule(hparams.target_module), MemoirLayer)
