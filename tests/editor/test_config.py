import warnings

import pytest

import memoir
from memoir import MemoirConfig
from memoir.architectures import resolve_config
from memoir.models import tiny_model


def test_json_round_trip(tmp_path):
    config = MemoirConfig(top_k=12, irr_threshold=0.55, context_seeds=("A", "B"), decay_scope="masked")
    assert MemoirConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "c.json")
    assert MemoirConfig.load(tmp_path / "c.json") == config


def test_unknown_keys_warn_and_are_dropped():
    with pytest.warns(UserWarning, match="unknown keys"):
        config = MemoirConfig.from_dict({"top_k": 3, "from_the_future": 1})
    assert config.top_k == 3


@pytest.mark.parametrize("arch,module", [
    ("llama", "model.layers.3.mlp.down_proj"), ("gpt2", "transformer.h.3.mlp.c_proj"),
    ("gptj", "transformer.h.3.mlp.fc_out"), ("gpt_neox", "gpt_neox.layers.3.mlp.dense_4h_to_h"),
])
def test_proportional_defaults_for_unknown_sizes(arch, module):
    config = resolve_config(tiny_model(arch), None)
    assert config.target_module == module  # round(0.84 * 4) = 3
    assert config.top_k == round(0.2857 * 512) and config.irr_threshold is not None


def test_public_api_is_pinned():
    assert sorted(memoir.__all__) == sorted(
        ["EditRecord", "EditResult", "MemoirConfig", "MemoirEditor", "MemoirLayer", "NonFiniteEditError", "attach",
         "load", "__version__"])
    for name in memoir.__all__:
        if name != "__version__":
            assert getattr(memoir, name).__doc__, name


def test_explicit_values_win_over_presets():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = resolve_config(tiny_model("llama"), MemoirConfig(top_k=7, irr_threshold=0.9))
    assert (config.top_k, config.irr_threshold) == (7, 0.9)
