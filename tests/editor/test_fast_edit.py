"""Fast editing path vs the plain recipe, checkpointed streams, cached context prefixes."""

import signal

import pytest
import torch

import memoir
from memoir.architectures import architecture_of
from memoir.checkpoint import StreamTerminated, read_progress
from memoir.models import TINY_ARCHITECTURES, tiny_model

from .helpers import EDITS, UNRELATED, tiny_config

ARCHS = [pytest.param(a, id=a) for a in TINY_ARCHITECTURES]
REQUESTS = [{"prompt": p, "target": t} for p, t in EDITS] + [{"prompt": "Carol plays the", "target": "cello"}]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own prefix cache, so none reads what another wrote."""
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))


def _edited(arch, tokenizer, fast: bool, layer: int, n_iter: int = 20):
    model = tiny_model(arch, vocab_size=len(tokenizer))
    paths = architecture_of(model)
    target = f"{paths.blocks}.{layer}.{paths.mlp_out}"
    editor = memoir.attach(model, tokenizer, tiny_config(fast_edit=fast, n_iter=n_iter, target_module=target))
    editor.fit_background(UNRELATED)
    results = [editor.edit(p, t) for p, t in EDITS[:2]]
    return editor, results


# Layer 1 of 4 leaves a middle block and the last block above the edited one (each runs its MLP
# on a different token selection); layer 3 is the last block itself.
@pytest.mark.parametrize("layer", [1, 3], ids=["blocks-above", "last-block"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_follows_the_plain_recipe(arch, padding_side, layer, char_tokenizer):
    char_tokenizer.padding_side = padding_side
    fast, fast_results = _edited(arch, char_tokenizer, fast=True, layer=layer)
    plain, plain_results = _edited(arch, char_tokenizer, fast=False, layer=layer)
    assert fast._stack is not None and fast._stack.mlp_path and plain._stack is None
    for fast_edit, plain_edit in zip(fast_results, plain_results, strict=True):
        assert fast_edit.iterations == plain_edit.iterations
        a, b = torch.tensor(fast_edit.losses), torch.tensor(plain_edit.losses)
        relative = ((a - b).abs() / b.abs().clamp_min(1e-6)).max().item()
        assert relative <= 1e-4, (fast_edit.losses, plain_edit.losses)
    assert torch.equal(fast.layer.bank_bits, plain.layer.bank_bits)
    torch.testing.assert_close(fast.layer.memory, plain.layer.memory, rtol=1e-4, atol=1e-5)


def _stream_editor(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    editor = memoir.attach(model, tokenizer, tiny_config(n_iter=10))
    editor.fit_background(UNRELATED)
    return editor


class _Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_stream_resumes_to_the_same_memory(char_tokenizer, tmp_path):
    whole = _stream_editor(char_tokenizer)
    expected = whole.edit_many(REQUESTS, progress=False)

    def stop_after_two(done):
        if done == 2:
            raise _Interrupt

    first = _stream_editor(char_tokenizer)
    with pytest.raises(_Interrupt):
        first.edit_many(REQUESTS, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5, on_edit=stop_after_two)
    assert read_progress(tmp_path)["done"] == 2  # saved on the way out, although no checkpoint was due

    resumed = _stream_editor(char_tokenizer)  # a new process: fresh model, fresh editor
    done_after_resume = []
    results = resumed.edit_many(REQUESTS, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1,
                                on_edit=done_after_resume.append)
    assert done_after_resume == [3, 4], "only the requests not yet in the checkpoint are edited"
    assert [r.losses for r in results] == [r.losses for r in expected]
    assert [r.mask_row for r in results] == [r.mask_row for r in expected]
    assert torch.equal(resumed.layer.memory, whole.layer.memory)
    assert torch.equal(resumed.layer.bank_bits, whole.layer.bank_bits)
    assert resumed.num_edits == whole.num_edits == len(REQUESTS)
    assert read_progress(tmp_path)["done"] == len(REQUESTS)

    again = _stream_editor(char_tokenizer)  # rerunning a finished stream edits nothing
    assert len(again.edit_many(REQUESTS, progress=False, checkpoint_dir=tmp_path, on_edit=pytest.fail)) == 4
    assert torch.equal(again.layer.memory, whole.layer.memory)


def test_sigterm_stops_a_stream_with_its_edits_checkpointed(char_tokenizer, tmp_path):
    """`kill` (SIGTERM) mid-stream acts like Ctrl-C: completed edits saved, handler restored after."""
    whole = _stream_editor(char_tokenizer)
    expected = whole.edit_many(REQUESTS, progress=False)
    handler_before = signal.getsignal(signal.SIGTERM)

    def terminate_after_one(done):
        if done == 1:
            signal.raise_signal(signal.SIGTERM)  # delivered to this (main) thread, between two edits

    first = _stream_editor(char_tokenizer)
    with pytest.raises(StreamTerminated):
        first.edit_many(REQUESTS, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5,
                        on_edit=terminate_after_one)
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert read_progress(tmp_path)["done"] == 1

    resumed = _stream_editor(char_tokenizer)
    resumed.edit_many(REQUESTS, progress=False, checkpoint_dir=tmp_path)
    assert torch.equal(resumed.layer.memory, whole.layer.memory)
    assert [r.losses for r in resumed.history] == [r.losses for r in expected[1:]]


def test_eval_stopped_by_sigterm_exits_143_with_a_resume_hint(monkeypatch, capsys, tmp_path):
    import memoir.cli

    def stopped(args):
        raise StreamTerminated("stopped by SIGTERM")

    monkeypatch.setattr(memoir.cli, "cmd_eval", stopped)
    assert memoir.cli.main(["eval", "--checkpoint", str(tmp_path)]) == 128 + signal.SIGTERM
    assert f"rerun the same command to resume from {tmp_path}" in capsys.readouterr().err


def test_checkpoint_of_another_stream_is_refused(char_tokenizer, tmp_path):
    editor = _stream_editor(char_tokenizer)
    editor.edit_many(REQUESTS[:2], progress=False, checkpoint_dir=tmp_path)
    other = _stream_editor(char_tokenizer)
    memory = other.layer.memory.clone()
    with pytest.raises(ValueError, match="another stream"):
        other.edit_many(REQUESTS[1:], progress=False, checkpoint_dir=tmp_path)
    assert torch.equal(other.layer.memory, memory) and other.layer.num_masks == 0


def test_checkpoint_with_other_settings_is_refused(char_tokenizer, tmp_path):
    _stream_editor(char_tokenizer).edit_many(REQUESTS[:1], progress=False, checkpoint_dir=tmp_path)
    model = tiny_model("llama", vocab_size=len(char_tokenizer))
    other = memoir.attach(model, char_tokenizer, tiny_config(n_iter=10, top_k=41))
    with pytest.raises(ValueError, match="top_k"):
        other.edit_many(REQUESTS, progress=False, checkpoint_dir=tmp_path)
    assert other.layer.num_masks == 0


def test_context_prefixes_are_generated_once_per_model(char_tokenizer, monkeypatch):
    first = _stream_editor(char_tokenizer)
    prefixes = first.ensure_context_prefixes()
    model = first.detach()

    import memoir.training

    def no_generation(*_args, **_kwargs):
        raise AssertionError("the prefixes should come from the cache")

    monkeypatch.setattr(memoir.training, "generate_context_prefixes", no_generation)
    second = memoir.attach(model, char_tokenizer, tiny_config(n_iter=10))
    assert second.ensure_context_prefixes() == prefixes
    second.detach()

    other_model = tiny_model("llama", seed=1, vocab_size=len(char_tokenizer))
    third = memoir.attach(other_model, char_tokenizer, tiny_config(n_iter=10))
    with pytest.raises(AssertionError, match="from the cache"):
        third.ensure_context_prefixes()  # another model: not served from the first one's cache


def test_float64_fast_path_equals_the_plain_recipe_to_float64_rounding(char_tokenizer):
    """In float64 (model and memory) the two paths agree far below the 1e-4 the issue asks; the
    float32 runs differ only by rounding that 30 SGD steps amplify."""
    results = {}
    for fast in (True, False):
        model = tiny_model("llama", vocab_size=len(char_tokenizer)).double()
        paths = architecture_of(model)
        config = tiny_config(fast_edit=fast, n_iter=20, memory_dtype="float64",
                             target_module=f"{paths.blocks}.1.{paths.mlp_out}")
        editor = memoir.attach(model, char_tokenizer, config)
        editor.fit_background(UNRELATED)
        results[fast] = ([editor.edit(p, t).losses for p, t in EDITS], editor.layer.memory.clone())
        assert editor.layer.memory.dtype == torch.float64
    for fast_losses, plain_losses in zip(results[True][0], results[False][0], strict=True):
        a, b = torch.tensor(fast_losses, dtype=torch.float64), torch.tensor(plain_losses, dtype=torch.float64)
        assert ((a - b).abs() / b.abs()).max().item() <= 1e-9
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-9, atol=1e-12)


def test_interrupted_evaluation_keeps_its_curve_points(char_tokenizer, tmp_path):
    """A resumed `eval --checkpoint` run reports the curve points scored before the interruption."""
    from memoir.evaluation import evaluate_sequential

    records = [{"src": r["prompt"], "alt": r["target"], "rephrase": r["prompt"] + "?", "loc": u, "loc_ans": "x"}
               for r, u in zip(REQUESTS, UNRELATED + ["Nothing here"], strict=True)]
    expected = evaluate_sequential(_stream_editor(char_tokenizer), records, UNRELATED, progress=False,
                                   points=[1, 2, 3])

    interrupted = _stream_editor(char_tokenizer)
    real_edit = interrupted.edit

    def edit_then_stop(*args, **kwargs):
        if interrupted.num_edits == 3:
            raise _Interrupt
        return real_edit(*args, **kwargs)

    interrupted.edit = edit_then_stop
    with pytest.raises(_Interrupt):
        evaluate_sequential(interrupted, records, UNRELATED, progress=False, points=[1, 2, 3],
                            checkpoint_dir=tmp_path, checkpoint_every=1)
    resumed = evaluate_sequential(_stream_editor(char_tokenizer), records, UNRELATED, progress=False,
                                  points=[1, 2, 3], checkpoint_dir=tmp_path, checkpoint_every=1)
    assert [p["edits"] for p in resumed["curve"]] == [1, 2, 3, 4]
    assert resumed["curve"] == expected["curve"]
    assert resumed["rel"] == expected["rel"] and resumed["loc"] == expected["loc"]


@pytest.mark.parametrize("arch", ["llama", "gptj", "gpt_neox"])
def test_fast_path_projects_only_the_tokens_that_reach_the_loss(arch, char_tokenizer):
    """Above the edited block, each attention projection sees only the tokens before each row's last
    loss position: never padding, never a row's last target token (rows here differ in length)."""
    model = tiny_model(arch, vocab_size=len(char_tokenizer))
    paths = architecture_of(model)
    editor = memoir.attach(model, char_tokenizer,
                           tiny_config(n_iter=2, target_module=f"{paths.blocks}.1.{paths.mlp_out}"))
    editor.fit_background(UNRELATED)
    block = model.get_submodule(paths.blocks)[2]
    mlp = block.get_submodule(editor._stack.mlp_path)
    projections = [m for m in block.modules() if isinstance(m, torch.nn.Linear)
                   and not any(m is inner for inner in mlp.modules())]
    assert projections, "no attention projection found"
    seen, batches = [], []
    original = memoir.training._FastLoss.__call__

    def step(self):
        batches.append(self.batch)
        # A forward hook sees the input the module actually ran on.
        handle = projections[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:-1].numel()))
        try:
            return original(self)
        finally:
            handle.remove()

    try:
        memoir.training._FastLoss.__call__ = step
        editor.edit(*EDITS[0])
    finally:
        memoir.training._FastLoss.__call__ = original
    lengths = batches[0].lengths
    assert int(lengths.min()) < int(lengths.max())  # padding present
    needed = int((lengths - 1).sum())
    assert len(seen) == len(batches) == 2
    assert all(rows == needed < batches[0].input_ids.numel() for rows in seen), (seen, needed)
