"""Seconds per edit, same model, same records, same run: the fast editing path vs the plain recipe,
and the preset vs the faithful recipe.

    python -m pytest benchmarks/bench_edit.py --benchmark-only --benchmark-json out.json

Cases:

- ``plain`` and ``fast``: the faithful recipe through the plain and the fast path, both exactly
  ``MEMOIR_BENCH_STEPS`` SGD steps per edit (default 30, early stop off), so the time per step is
  what differs; the fast case's ``extra_info`` holds ``speedup_vs_plain``.
- ``faithful`` and ``preset``: each recipe as shipped, with its own step count and early stop
  (faithful: ``MemoirConfig(rehearse=0, answer_end="none", train_chat=False, n_iter=30,
  early_stop_loss=0.02, early_stop_delta=1e-4)``; preset: ``MemoirConfig()``); the preset case's
  ``extra_info`` holds ``preset_vs_faithful``, the ratio of the median seconds per edit.

Every case first stores ``MEMOIR_BENCH_WARM`` edits (untimed, default 4, so that rehearsal has
stored edits to choose from), then times the next ``MEMOIR_BENCH_RECORDS`` (default 3).

The model is chosen by ``MEMOIR_BENCH_MODEL``: ``smollm2`` (default; the bundled SmolLM2-135M,
CPU or GPU), ``llama3-8b`` (LLaMA-3-8B's shapes with random bf16 weights, for a GPU) or ``tiny``.
"""

import os
import statistics
import time

import pytest
import torch

import memoir
from memoir import MemoirConfig

MODEL = os.environ.get("MEMOIR_BENCH_MODEL", "smollm2")
STEPS = int(os.environ.get("MEMOIR_BENCH_STEPS", "30"))
RECORDS = int(os.environ.get("MEMOIR_BENCH_RECORDS", "3"))
WARM = int(os.environ.get("MEMOIR_BENCH_WARM", "4"))
_seconds: dict[str, float] = {}


def _llama3_shaped(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=max(len(tokenizer), 128256), rope_theta=500000.0,
                         max_position_embeddings=8192)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _tiny(tokenizer):
    from memoir.models import tiny_model

    return tiny_model("llama", vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from memoir.models import load_smollm2

    model, tokenizer = load_smollm2()
    if MODEL == "llama3-8b":
        model = _llama3_shaped(tokenizer)
    elif MODEL == "tiny":
        model = _tiny(tokenizer)
    elif torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


@pytest.fixture(scope="module")
def requests():
    from memoir.cli import _default_data
    from memoir.evaluation import background_sentences, edit_records, load_zsre

    records = load_zsre(_default_data())
    edits, _ = edit_records(records, WARM + RECORDS)
    return [{"prompt": r["src"], "target": r["alt"]} for r in edits], background_sentences(records[1000:1100], 20)


FAITHFUL = dict(rehearse=0, answer_end="none", train_chat=False, n_iter=30, early_stop_loss=0.02,
                early_stop_delta=1e-4)
CONFIGS = {
    "plain": MemoirConfig(**{**FAITHFUL, "fast_edit": False, "n_iter": STEPS, "early_stop_loss": 0.0}),
    "fast": MemoirConfig(**{**FAITHFUL, "n_iter": STEPS, "early_stop_loss": 0.0}),
    "faithful": MemoirConfig(**FAITHFUL),
    "preset": MemoirConfig(),
}


def _prepared_editor(model, tokenizer, background, config: MemoirConfig, warm: list[dict]):
    editor = memoir.attach(model, tokenizer, config)
    editor.fit_background(background)
    editor.ensure_context_prefixes()
    editor.edit_many(warm, progress=False)
    return editor


def _edit_all(editor, edits, steps: list[int]) -> list[float]:
    """Seconds of each edit of ``edits``, made in sequence; appends each edit's step count to ``steps``."""
    seconds = []
    for request in edits:
        start = time.perf_counter()
        result = editor.edit(request["prompt"], request["target"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        steps.append(result.iterations)
    return seconds


@pytest.mark.parametrize("path", list(CONFIGS))
def test_seconds_per_edit(benchmark, record, model_and_tokenizer, requests, path):
    model, tokenizer = model_and_tokenizer
    edits, background = requests
    warm, edits = edits[:WARM], edits[WARM:]
    editor = _prepared_editor(model, tokenizer, background, CONFIGS[path], warm)
    steps = []
    benchmark.group = f"edit {MODEL}"
    try:
        seconds = benchmark.pedantic(_edit_all, args=(editor, edits, steps), rounds=1, iterations=1)
        config = editor.config
    finally:
        editor.detach()
    _seconds[path] = statistics.median(seconds)
    values = {"model": MODEL, "edits": len(edits), "median_sec_per_edit": _seconds[path],
              "mean_steps_per_edit": statistics.mean(steps), "config": config.to_dict()}
    if path == "fast" and "plain" in _seconds:
        values["speedup_vs_plain"] = _seconds["plain"] / _seconds["fast"]
    if path == "preset" and "faithful" in _seconds:
        values["preset_vs_faithful"] = _seconds["preset"] / _seconds["faithful"]
    record(**values)
