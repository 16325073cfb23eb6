"""Many threads through one editor: each gets exactly what it gets alone; edits wait for forward calls."""

import random
import threading

import pytest
import torch

import memoir
from memoir.models import tiny_model

from .helpers import EDITS, UNRELATED, target_accuracy, tiny_config

PROMPTS = [p for p, _ in EDITS] + UNRELATED


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def editor(char_tokenizer):
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    editor = memoir.attach(model, char_tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    yield editor
    editor.detach()


def _generate(editor, prompt: str) -> list[int]:
    batch = editor.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = editor.generate(**batch, max_new_tokens=6, do_sample=False)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def _route(editor, prompt: str) -> tuple:
    routed = editor.route([prompt])
    return routed["index"][0], routed["overlap"][0], routed["gate"][0]


def _run_threads(count: int, work) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(number):
        try:
            work(number)
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors


def test_threads_route_and_generate_as_they_would_alone(editor):
    alone = {p: (_generate(editor, p), _route(editor, p)) for p in PROMPTS}
    assert [alone[p][1][2] for p in PROMPTS] == [True] * len(EDITS) + [False] * len(UNRELATED)
    mismatches = []

    def work(number):
        rng = random.Random(number)
        for _ in range(12):
            prompt = rng.choice(PROMPTS)
            got = (_generate(editor, prompt), _route(editor, prompt))
            if got != alone[prompt]:
                mismatches.append((prompt, got, alone[prompt]))

    errors = _run_threads(4, work)
    assert not errors, errors
    assert not mismatches, mismatches[:3]


def test_an_edit_waits_for_other_threads_and_they_for_it(editor):
    alone = {p: _generate(editor, p) for p in UNRELATED}
    mismatches, done = [], threading.Event()

    def work(number):
        if number == 0:
            try:
                editor.edit("Carol plays the", "cello")
            finally:
                done.set()
            return
        rng = random.Random(number)
        while not done.is_set():
            prompt = rng.choice(UNRELATED)
            got = _generate(editor, prompt)
            if got != alone[prompt]:  # an edit's training mode or a half-written memory would show
                mismatches.append((prompt, got))

    errors = _run_threads(3, work)
    assert not errors, errors
    assert not mismatches, mismatches[:3]
    assert target_accuracy(editor, "Carol plays the", "cello") == 1.0
    assert [r.prompt for r in editor.edits][-1] == "Carol plays the"


def test_the_memory_cannot_change_from_inside_a_forward_call(editor):
    def hook(_module, _args, _output):
        editor.withdraw(0)

    handle = editor.model.model.layers[0].register_forward_hook(hook)
    try:
        with pytest.raises(RuntimeError, match="inside a forward call"):
            editor.route([EDITS[0][0]])
    finally:
        handle.remove()
    assert editor.edits[0].status == "active"
    assert editor.route([EDITS[0][0]])["gate"] == [True]  # nothing was left locked
