"""The SmolLM2 cache is published atomically: concurrent first uses never see a half-written copy."""

import threading
import time

import pytest

from memoir.models import _publish_directory


def _writer(label: str, started: threading.Barrier):
    def write(directory):
        started.wait()  # every writer is mid-conversion at the same time
        (directory / "weights.bin").write_text(label * 1000)
        time.sleep(0.05)
        (directory / "config.json").write_text(label)

    return write


def test_concurrent_publishers_leave_one_complete_copy(tmp_path):
    final = tmp_path / "cache" / "model"
    started = threading.Barrier(4)
    errors = []

    def publish(label):
        try:
            _publish_directory(final, _writer(label, started), complete_marker="config.json")
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=publish, args=(label,)) for label in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    label = (final / "config.json").read_text()
    assert label in "abcd" and (final / "weights.bin").read_text() == label * 1000  # one writer's whole copy
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]  # no private directory left


def test_incomplete_leftover_is_replaced(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights.bin").write_text("half")
    _publish_directory(final, _writer("z", threading.Barrier(1)), complete_marker="config.json")
    assert (final / "config.json").read_text() == "z" and (final / "weights.bin").read_text() == "z" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "model"

    def broken(directory):
        (directory / "weights.bin").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _publish_directory(final, broken, complete_marker="config.json")
    assert list(tmp_path.iterdir()) == []
