"""Concurrency: many threads run the model through one editor; changes to the memory wait for them.

Routing state is per thread (see :class:`memoir.layer.MemoirLayer` and :mod:`memoir.routing`): each
forward call, and each ``generate``, routes on its own inputs whatever other threads do. What is
shared is the memory itself, so the operations that change it (edits, withdrawals, fitting mu) take
the gate's write side: they wait until no other thread is inside a forward call, and other threads'
forward calls wait until the change is done. A thread that holds the write side may run the model
itself (an edit's own forward passes).

A ``generate`` is many forward calls: an edit made by another thread between two of its decode
steps is seen from the next step on.
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["ReadWriteGate"]


class ReadWriteGate:
    """Many readers (forward calls) or one writer (a memory change); the writer may nest and read."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._mine = threading.local()  # this thread's open reads

    def enter_read(self) -> None:
        """Block while another thread changes the memory, then count this reader."""
        me = threading.get_ident()
        with self._cond:
            while self._writer is not None and self._writer != me:
                self._cond.wait()
            self._readers += 1
        self._mine.reads = getattr(self._mine, "reads", 0) + 1

    def exit_read(self) -> None:
        self._mine.reads -= 1
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def reading(self) -> bool:
        """True while this thread is inside a forward call it entered."""
        return getattr(self._mine, "reads", 0) > 0

    @contextlib.contextmanager
    def write(self):
        """Exclusive access for a memory change: waits for other threads' forward calls to finish."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                if self.reading():
                    raise RuntimeError("MEMOIR: the memory cannot change from inside a forward call of the model")
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()
