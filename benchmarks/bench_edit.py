"""Seconds per edit: the fast editing path vs the plain recipe, and rehearsal on vs off, same model,
same records, same run.

    python -m pytest benchmarks/bench_edit.py --benchmark-only --benchmark-json out.json

Cases: ``plain`` and ``fast`` edit with the faithful recipe (no rehearsal); ``fast-rehearse``
uses the preset's rehearsal. Every case first stores ``MEMOIR_BENCH_WARM`` edits (untimed, default
4, so that rehearsal has stored edits to choose from), then times the next ``MEMOIR_BENCH_RECORDS``.

The model is chosen by ``MEMOIR_BENCH_MODEL``: ``smollm2`` (default; the bundled SmolLM2-135M,
CPU or GPU), ``llama3-8b`` (LLaMA-3-8B's shapes with random bf16 weights, for a GPU) or ``tiny``.
Both paths run exactly ``MEMOIR_BENCH_STEPS`` SGD steps per edit (default 30, the recipe's
maximum; early stop off) on the same ZsRE records, so the time per step is what differs. The plain recipe is the baseline; the
speed-up is written into the fast case's ``extra_info``.
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


def _prepared_editor(model, tokenizer, background, fast: bool, rehearse: int | None, warm: list[dict]):
    config = MemoirConfig(fast_edit=fast, n_iter=STEPS, early_stop_loss=0.0, rehearse=rehearse)
    editor = memoir.attach(model, tokenizer, config)
    editor.fit_background(background)
    editor.ensure_context_prefixes()
    editor.edit_many(warm, progress=False)
    return editor


def _edit_all(editor, edits) -> list[float]:
    """Seconds of each edit of ``edits``, made in sequence."""
    seconds = []
    for request in edits:
        start = time.perf_counter()
        editor.edit(request["prompt"], request["target"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


@pytest.mark.parametrize("path", ["plain", "fast", "fast-rehearse"])
def test_seconds_per_edit(benchmark, record, model_and_tokenizer, requests, path):
    model, tokenizer = model_and_tokenizer
    edits, background = requests
    warm, edits = edits[:WARM], edits[WARM:]
    editor = _prepared_editor(model, tokenizer, background, fast=path != "plain",
                              rehearse=None if path == "fast-rehearse" else 0, warm=warm)
    benchmark.group = f"edit {MODEL}"
    try:
        seconds = benchmark.pedantic(_edit_all, args=(editor, edits), rounds=1, iterations=1)
    finally:
        editor.detach()
    _seconds[path] = statistics.median(seconds)
    values = {"model": MODEL, "steps_per_edit": STEPS, "edits": len(edits), "median_sec_per_edit": _seconds[path],
              "rehearse": editor.config.rehearse}
    if path == "fast" and "plain" in _seconds:
        values["speedup_vs_plain"] = _seconds["plain"] / _seconds["fast"]
    if path == "fast-rehearse" and "fast" in _seconds:
        values["rehearse_cost_vs_fast"] = _seconds["fast-rehearse"] / _seconds["fast"]
    record(**values)
