"""The verified memory format: every corruption of a saved memory is refused before the model changes."""

import json
import random

import pytest
import torch
from safetensors import safe_open

import memoir
from memoir.layer import MemoirLayer
from memoir.models import tiny_model
from memoir.persistence import CONFIG_FILE, MEMORY_FILE, _write_memory_file

from .helpers import EDITS, UNRELATED, tiny_config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def saved(char_tokenizer, tmp_path):
    """A memory of three edits saved at tmp_path/memory; returns (model, directory, its tensors)."""
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    editor.save(tmp_path / "memory")
    tensors = {name: t.clone() for name, t in _read(tmp_path / "memory")[1].items()}
    editor.detach()
    return model, tmp_path / "memory", tensors


def _read(directory):
    with safe_open(str(directory / MEMORY_FILE), framework="pt") as handle:
        return dict(handle.metadata()), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def _rewrite(directory, tensors=None, metadata=None, config=None):
    """Rewrite the memory with changed contents and a *valid* checksum, so that only the structural
    checks can catch the change; ``config`` changes go into both the file and the JSON copy."""
    old_metadata, old_tensors = _read(directory)
    new_metadata = {**old_metadata, **(metadata or {})}
    if config:
        data = {**json.loads(new_metadata["config"]), **config}
        new_metadata["config"] = json.dumps(data)
        (directory / CONFIG_FILE).write_text(json.dumps(data))
    new_metadata.pop("checksum")
    _write_memory_file(directory, {**old_tensors, **(tensors or {})}, new_metadata)


def _snapshot(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    assert not any(isinstance(m, MemoirLayer) for m in model.modules())
    assert not hasattr(model, "_memoir_editor") and not model._forward_pre_hooks
    now = model.state_dict()
    assert now.keys() == snapshot.keys() and all(torch.equal(now[k], snapshot[k]) for k in now)


def _refused(model, tokenizer, directory, match):
    snapshot = _snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        memoir.load(model, tokenizer, directory)
    _assert_untouched(model, snapshot)


def _flip_bit(bank, row, bit):
    bank = bank.clone()
    bank[row, bit // 64] ^= torch.tensor(1, dtype=torch.int64) << (bit % 64)
    return bank


def test_the_saved_memory_loads_bit_identical(saved, char_tokenizer):
    model, directory, tensors = saved
    editor = memoir.load(model, char_tokenizer, directory)
    assert torch.equal(editor.layer.memory, tensors["memory"])
    assert torch.equal(editor.layer.bank_bits, tensors["bank_bits"])


@pytest.mark.parametrize("case,match", [
    ("row_bits", "exactly top_k"), ("zero_row", "exactly top_k"), ("duplicate_rows", "duplicate"),
    ("nan_memory", "memory holds NaN"), ("inf_mu", "background_mean holds NaN"),
    ("float_permutation", "permutation is torch.float32"), ("not_a_permutation", "not a permutation"),
    ("top_k", "exactly top_k"), ("counts", "counts disagree"), ("extra_tensor", "expected"),
])
def test_structural_corruptions_are_refused(saved, char_tokenizer, case, match):
    model, directory, tensors = saved
    bank, perm = tensors["bank_bits"], tensors["permutation"]
    changes = {
        "row_bits": dict(tensors={"bank_bits": _flip_bit(bank, 1, 3)}),
        "zero_row": dict(tensors={"bank_bits": torch.cat([bank[:2], torch.zeros_like(bank[:1])])}),
        "duplicate_rows": dict(tensors={"bank_bits": torch.cat([bank[:2], bank[:1]])}),
        "nan_memory": dict(tensors={"memory": tensors["memory"].index_fill(0, torch.tensor([4]), float("nan"))}),
        "inf_mu": dict(tensors={"background_mean": tensors["background_mean"].index_fill(0, torch.tensor([0]),
                                                                                         float("inf"))}),
        "float_permutation": dict(tensors={"permutation": perm.float()}),
        "not_a_permutation": dict(tensors={"permutation": perm.index_fill(0, torch.tensor([0]), int(perm[1]))}),
        "top_k": dict(config={"top_k": tiny_config().top_k + 1}),
        "counts": dict(metadata={"num_edits": "7"}),
        "extra_tensor": dict(tensors={"other": torch.zeros(2)}),
    }[case]
    _rewrite(directory, **changes)
    _refused(model, char_tokenizer, directory, match)


def test_padding_bits_are_refused(char_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=48, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    editor = memoir.attach(model, char_tokenizer, tiny_config(top_k=30, target_module="model.layers.1.mlp.down_proj"))
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    editor.save(tmp_path)
    editor.detach()
    bank = _read(tmp_path)[1]["bank_bits"]
    _rewrite(tmp_path, tensors={"bank_bits": _flip_bit(bank, 0, 250)})  # bit 250 >= D = 200
    _refused(model, char_tokenizer, tmp_path, "padding bits")


def test_flipped_tensor_bytes_fail_the_checksum(saved, char_tokenizer):
    model, directory, _ = saved
    path = directory / MEMORY_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(data))
    _refused(model, char_tokenizer, directory, "checksum")


def test_an_interrupted_save_is_refused_not_loaded_as_whole(saved, char_tokenizer):
    model, directory, _ = saved
    copy = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**copy, "irr_threshold": 0.5}))  # a newer save's config
    _refused(model, char_tokenizer, directory, "irr_threshold")
    (directory / CONFIG_FILE).unlink()  # the memory file alone is complete
    memoir.load(model, char_tokenizer, directory).detach()


def test_a_config_from_a_newer_version_is_refused(saved, char_tokenizer):
    model, directory, _ = saved
    _rewrite(directory, config={"version": 99})
    _refused(model, char_tokenizer, directory, "newer")


def test_the_fingerprint_covers_the_whole_model(saved, char_tokenizer):
    model, directory, _ = saved
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0  # not the edited layer; sampled position
    _refused(model, char_tokenizer, directory, "another model")


def test_save_pretrained_fingerprint_is_the_same_attached_or_not(saved, char_tokenizer):
    from memoir.persistence import model_fingerprint

    model, directory, _ = saved
    plain = model_fingerprint(model)
    editor = memoir.load(model, char_tokenizer, directory)
    assert model_fingerprint(model) == plain
    editor.detach()


def _corrupt(rng, directory, originals):
    """One random corruption of the saved memory (the originals are restored first)."""
    for name, data in originals.items():
        (directory / name).write_bytes(data)
    kind = rng.choice(["flip", "truncate", "json", "swap", "header"])
    memory = bytearray(originals[MEMORY_FILE])
    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            memory[rng.randrange(len(memory))] ^= 1 << rng.randrange(8)
        (directory / MEMORY_FILE).write_bytes(bytes(memory))
    elif kind == "truncate":
        (directory / MEMORY_FILE).write_bytes(bytes(memory[: rng.randrange(len(memory))]))
    elif kind == "json":
        config = json.loads(originals[CONFIG_FILE])
        key = rng.choice(sorted(config))
        config[key] = rng.choice([None, -1, 0.5, "x", True, [1], config[key]])
        (directory / CONFIG_FILE).write_text(json.dumps(config))
    elif kind == "swap":
        metadata, tensors = _read(directory)
        a, b = rng.sample(sorted(tensors), 2)
        tensors[a], tensors[b] = tensors[b], tensors[a]
        from safetensors.torch import save_file

        save_file(tensors, str(directory / MEMORY_FILE), metadata=metadata)
    else:  # a header value edited, checksum left as it was
        metadata, tensors = _read(directory)
        key = rng.choice(sorted(metadata))
        metadata[key] = rng.choice(["", "0", "[]", "null", metadata[key] + " "])
        from safetensors.torch import save_file

        save_file(tensors, str(directory / MEMORY_FILE), metadata=metadata)
    return kind


def test_fuzzed_memories_load_identical_or_raise_leaving_the_model_unchanged(saved, char_tokenizer):
    model, directory, tensors = saved
    originals = {name: (directory / name).read_bytes() for name in (MEMORY_FILE, CONFIG_FILE)}
    snapshot = _snapshot(model)
    rng = random.Random(20261207)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(200):
        kind = _corrupt(rng, directory, originals)
        try:
            editor = memoir.load(model, char_tokenizer, directory)
        except (ValueError, FileNotFoundError) as error:
            assert str(error), kind
            _assert_untouched(model, snapshot)
            outcomes["refused"] += 1
            continue
        assert torch.equal(editor.layer.memory, tensors["memory"]), kind
        assert torch.equal(editor.layer.bank_bits, tensors["bank_bits"]), kind
        assert torch.equal(editor.layer.permutation, tensors["permutation"]), kind
        assert torch.equal(editor.layer.background_mean, tensors["background_mean"]), kind
        editor.detach()
        outcomes["loaded"] += 1
    assert outcomes["refused"] >= 150, outcomes  # nearly every corruption is caught, none loads wrong


def test_save_pretrained_with_an_editor_attached_writes_the_original_model(char_tokenizer, tmp_path):
    import warnings

    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    original = _snapshot(model)
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    assert model.state_dict().keys() == original.keys()  # no base_layer. names, no memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing / unexpected keys, no re-initialised layer
        model.save_pretrained(tmp_path / "model")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    again = reloaded.state_dict()
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_an_original_checkpoint_loads_into_a_model_with_an_editor_attached(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    other = {k: v + 0.5 for k, v in tiny_model("llama", seed=5, vocab_size=len(char_tokenizer)).state_dict().items()}
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    editor.edit(*EDITS[0])
    memory = editor.layer.memory.detach().clone()
    result = model.load_state_dict(other, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    weight_name = editor.config.target_module + ".weight"
    assert torch.equal(editor.layer.base_layer.weight, other[weight_name])
    assert torch.equal(editor.layer.memory, memory)  # the memory is not part of a model checkpoint


@pytest.mark.parametrize("size", [1, 2, 15, 16, 17, 1000, 28_311_552, 2**31 + 11])
def test_fingerprint_samples_stay_inside_large_tensors(size):
    from memoir.persistence import sample_positions

    picks = sample_positions(size).tolist()
    assert len(picks) == min(16, size) and picks[0] == 0 and picks[-1] == size - 1
    assert picks == sorted(set(picks))  # distinct, increasing, all inside
