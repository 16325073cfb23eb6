"""Checkpoints of a long stream of edits: resume after a crash or Ctrl-C, nothing lost or repeated.

A checkpoint directory is a saved memory (see :mod:`memoir.persistence`) whose file header also
records the stream's progress: how many requests are in that memory, a digest of exactly those
requests, and what each edit did. Tensors and progress are one atomic file write, so whatever
moment a run dies at, the checkpoint on disk is a consistent state. A resumed run restores the
memory and skips the requests already done; SGD without momentum keeps no optimiser state, so the
resumed memory ends bit for bit where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import signal
import threading
from pathlib import Path

from .persistence import MEMORY_FILE, read_metadata, restore_into, save_editor
from .training import EditResult

__all__ = ["StreamTerminated", "stream_digest", "read_progress", "write_checkpoint", "resume_stream",
           "terminate_as_interrupt"]

_PROGRESS_KEY = "stream_progress"


class StreamTerminated(KeyboardInterrupt):
    """A stream of edits stopped by SIGTERM; its completed edits were checkpointed on the way out."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM stops the work the way Ctrl-C does (raises :class:`StreamTerminated`).

    Job schedulers, ``kill`` and container shutdowns send SIGTERM, whose default action ends the
    process at once, skipping the ``finally`` that saves the last edits; and a process started with
    ``nohup`` from a script ignores SIGINT, so SIGTERM is the only way to stop it. Only the first
    SIGTERM raises: later ones are ignored until the block exits, so they cannot cut short the
    checkpoint written on the way out. Outside the main thread signals cannot be handled; nothing
    changes there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def on_sigterm(signum, frame):
        nonlocal raised
        if not raised:
            raised = True
            raise StreamTerminated("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stream_digest(pairs: list[tuple[str, str]]) -> str:
    """SHA-256 of an ordered list of ``(prompt, target)`` edits."""
    digest = hashlib.sha256()
    for prompt, target in pairs:
        digest.update(json.dumps([prompt, target]).encode("utf-8"))
    return digest.hexdigest()


def read_progress(directory) -> dict | None:
    """The stream progress saved in a checkpoint directory, or ``None`` when it holds none."""
    if not (Path(directory) / MEMORY_FILE).is_file():
        return None
    text = read_metadata(directory).get(_PROGRESS_KEY)
    if text is None:
        raise ValueError(f"{directory} holds a saved memory but no stream progress: not a checkpoint of edit_many")
    try:
        progress = json.loads(text)
        int(progress["done"]), str(progress["digest"]), list(progress["results"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the progress record in {directory} is corrupted: {error}") from error
    return progress


def write_checkpoint(editor, directory, pairs: list[tuple[str, str]], done: int, results: list[EditResult]) -> None:
    """Save the memory together with the record that it holds the first ``done`` requests of ``pairs``."""
    progress = {
        "done": done,
        "total": len(pairs),
        "digest": stream_digest(pairs[:done]),
        "results": [dataclasses.asdict(r) for r in results],
    }
    save_editor(editor, directory, extra_metadata={_PROGRESS_KEY: json.dumps(progress)})


def _check_editor_is_a_prefix(editor, done_pairs: list[tuple[str, str]], directory) -> None:
    """Resuming replaces the editor's memory: refuse unless what it holds is the checkpoint's own start."""
    if not editor.num_edits:
        return
    held = [(r.prompt, r.target) for r in editor.edits]
    if editor.registry.unrecorded or len(held) > len(done_pairs) or held != done_pairs[: len(held)]:
        raise ValueError(f"this editor already holds {editor.num_edits} edits that are not the start of the "
                         f"checkpoint's stream at {directory}; resuming would replace them. Resume on a freshly "
                         "attached editor, or use another checkpoint directory")


def resume_stream(editor, directory, pairs: list[tuple[str, str]]) -> tuple[int, list[EditResult]]:
    """Restore ``editor`` from the checkpoint in ``directory`` if it continues ``pairs``.

    Returns ``(done, results)``: how many requests are already in the memory and their results
    (``(0, [])`` when the directory holds no checkpoint yet). Raises ``ValueError`` when the
    checkpoint belongs to another stream of edits, another model or other settings; the editor is
    then unchanged.
    """
    progress = read_progress(directory)
    if progress is None:
        return 0, []
    done = int(progress["done"])
    if done > len(pairs) or stream_digest(pairs[:done]) != progress["digest"]:
        raise ValueError(f"the checkpoint at {directory} holds {done} edits of another stream of requests; "
                         "use another checkpoint directory or the same requests in the same order")
    _check_editor_is_a_prefix(editor, pairs[:done], directory)
    restore_into(editor, directory)
    return done, [EditResult(**r) for r in progress["results"]]
