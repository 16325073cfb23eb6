"""memoir.compare: loss-trajectory differences between two eval reports."""

import json

import pytest

from memoir.compare import loss_differences, main


def _report(losses, rel=1.0):
    return {"rel": rel, "gen": 0.5, "loc": 1.0, "sec_per_edit": 2.0, "median_sec_per_edit": 2.0,
            "per_record": {"losses": losses}}


def test_relative_difference_per_edit():
    first = _report([[1.0, 0.5], [2.0, 1.0, 0.1]])
    second = _report([[1.0, 0.5], [2.0, 1.0, 0.2]])
    assert loss_differences(first, second) == [0.0, pytest.approx(0.5)]


def test_different_step_counts_are_not_comparable(tmp_path, capsys):
    paths = []
    for name, losses in (("a", [[1.0, 0.5]]), ("b", [[1.0]])):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_report(losses)))
    assert main([str(p) for p in paths]) == 1
    assert "1 in the other" in capsys.readouterr().err
