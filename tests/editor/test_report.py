"""The evaluation report: Markdown summary and PNG plots written from the eval JSON alone."""

import json
import re

import pytest

from memoir.cli import main
from memoir.report import load_results, summary_markdown, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_report(with_sweep: bool = False) -> dict:
    """A small report shaped like the one ``python -m memoir eval --out`` writes."""
    report = {
        "edits": 8, "rel": 0.9375, "gen": 0.8125, "loc": 0.99, "avg": (0.9375 + 0.8125 + 0.99) / 3,
        "pre_rel": 0.125, "pre_gen": 0.1875, "sec_per_edit": 1.5, "median_sec_per_edit": 1.25,
        "mean_iterations": 12.5, "mean_final_loss": 0.031, "overlap_edit": 1.0, "overlap_rephrase": 0.71,
        "overlap_unrelated": 0.45, "edit_routed_to_own_mask": 1.0, "rephrase_routed_to_own_mask": 0.75,
        "unrelated_gated": 0.0, "masks": 8, "rel_by_age_quarter": [0.875, 1.0, 0.875, 1.0],
        "contradicted_later": 3, "rel_contradicted_later": 0.8333, "rel_not_contradicted": 1.0,
        "skipped_empty_target": 1, "model": "tiny", "config": {"irr_threshold": 0.55, "top_k": 439,
                                                                "target_module": "model.layers.22.mlp.down_proj"},
        "per_record": {
            "rel": [1.0] * 8, "gen": [0.5, 1.0] * 4, "loc": [1.0] * 8,
            "overlap_edit": [1.0] * 8,
            "overlap_rephrase": [0.6, 0.7, 0.8, 0.9, 0.5, 0.65, 0.75, 0.78],
            "overlap_unrelated": [0.41, 0.44, 0.46, 0.47, 0.42, 0.45, 0.43, 0.48],
        },
        "curve": [{"edits": 2, "rel": 1.0, "gen": 0.75, "loc": 1.0}, {"edits": 4, "rel": 0.9688, "gen": 0.8, "loc": 1.0},
                  {"edits": 8, "rel": 0.9375, "gen": 0.8125, "loc": 0.99}],
    }
    if with_sweep:
        report["threshold_sweep"] = [{"tau": t, "rel": 1.0, "gen": 0.9 - t / 2, "loc": 0.5 + t / 2}
                                     for t in (0.4, 0.5, 0.6)]
    return report


def _is_png(path) -> bool:
    from PIL import Image

    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return False
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size[0] > 300 and image.size[1] > 200


def test_report_files_are_written(tmp_path):
    paths = write_report(synthetic_report(), tmp_path / "report")
    assert set(paths) == {"summary", "curve", "overlap_histogram"}
    for name in ("curve", "overlap_histogram"):
        assert paths[name].is_file() and _is_png(paths[name]), name
    text = paths["summary"].read_text()
    # the summary table carries the numbers, before and after
    assert "| Rel | 0.125 | 0.938 |" in text
    assert "| Gen | 0.188 | 0.812 |" in text
    assert "| Loc | 1.000 | 0.990 |" in text
    assert f"| Avg | {(0.125 + 0.1875 + 1) / 3:.3f} | {(0.9375 + 0.8125 + 0.99) / 3:.3f} |" in text
    assert "1.50 s per edit" in text
    assert "| 4 | 0.969 | 0.800 | 1.000 |" in text  # the curve, as a table too
    assert "tau 0.55" in text and "1 record(s) with an empty target" in text
    assert "(overlap_histogram.png)" in text and "(curve.png)" in text


def test_threshold_sweep_adds_a_table_and_a_plot(tmp_path):
    paths = write_report(synthetic_report(with_sweep=True), tmp_path)
    assert _is_png(paths["threshold_sweep"])
    assert "| 0.50 | 1.000 | 0.650 | 0.750 |" in paths["summary"].read_text()


def test_missing_values_read_as_na():
    """NaN (a loaded memory has no editing time; a score that could not be computed) and absent
    keys read as n/a, never as "nan", and poison only their own cells: the Avg made from a NaN
    score is n/a too, while the cells around it still show their own numbers."""
    report = synthetic_report()
    report["sec_per_edit"] = float("nan")  # a loaded memory: no editing time
    report["gen"] = float("nan")
    del report["per_record"], report["curve"], report["avg"], report["pre_gen"]
    text = summary_markdown(report)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "n/a s per edit" in text
    assert "| Gen | n/a | n/a |" in text
    assert f"| Rel | {report['pre_rel']:.3f} | {report['rel']:.3f} |" in text
    assert "| Avg | n/a | n/a |" in text  # before: pre_gen absent; after: gen NaN
    assert f"median {report['median_sec_per_edit']:.2f} s" in text
    assert "## Scores as edits accumulate" not in text  # no curve, no empty section


def test_report_from_a_results_file_via_the_cli(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(synthetic_report()))
    assert main(["report", str(results), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "summary.md").is_file()
    assert _is_png(tmp_path / "out" / "overlap_histogram.png")
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("content,match", [
    pytest.param("not json", "not JSON", id="not-json"),
    pytest.param("[1, 2]", "JSON object", id="array"),
    pytest.param('{"edits": 3}', r"missing \['rel', 'gen', 'loc'\]", id="not-a-report"),
])
def test_bad_results_file_raises_clearly(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_results(path)
    with pytest.raises(FileNotFoundError, match="no results file"):
        load_results(tmp_path / "absent.json")


def test_eval_parser_has_the_report_option():
    from memoir.cli import build_parser

    args = build_parser().parse_args(["eval", "--edits", "2", "--report", "out/"])
    assert args.report == "out/"


def test_summary_reports_rel_of_contradicted_edits():
    text = summary_markdown(synthetic_report())
    assert "Rel of the 3 edits that a later edit contradicts" in text and "of the other 5: 1.000" in text


def test_later_contradictions_need_the_same_subject_and_another_target():
    from memoir.evaluation import _rel_by_contradiction, later_contradictions

    records = [{"subject": "A", "alt": "x"}, {"subject": "B", "alt": "y"}, {"subject": "A", "alt": "x"},
               {"subject": "A", "alt": "z"}, {"subject": "B", "alt": "y"}, {"alt": "w"}, {"alt": "v"}]
    # record 0 and 2 are contradicted by record 3; record 1's later B edit has the same target
    assert later_contradictions(records) == [True, False, True, False, False, False, False]
    scores = _rel_by_contradiction(records, [0.5, 1.0, 0.7, 1.0, 1.0, 0.9, 0.8])
    assert scores["contradicted_later"] == 2
    assert scores["rel_contradicted_later"] == pytest.approx(0.6)
    assert scores["rel_not_contradicted"] == pytest.approx(0.94)


def test_one_per_subject_keeps_the_first_record_of_each_subject():
    from memoir.evaluation import edit_stream, first_of_each_subject, later_contradictions

    records = [{"subject": "A", "src": "a?", "alt": "x"}, {"subject": "A", "src": "a2?", "alt": "y"},
               {"subject": "B", "src": "b?", "alt": ""}, {"subject": "B", "src": "b2?", "alt": "z"},
               {"src": "c?", "alt": "w"}, {"src": "d?", "alt": "v"}, {"subject": "E", "src": "e?", "alt": "u"}]
    # B's first record has an empty target: it is skipped (and counted), B's next record is B's edit
    assert first_of_each_subject(records) == [0, 2, 3, 4, 5, 6]
    edits, info = edit_stream(records, 3, one_per_subject=True)
    assert [r["src"] for r in edits] == ["a?", "b2?", "c?"]
    assert info == {"skipped_empty_target": 1, "one_per_subject": True, "last_source_record": 4}
    assert not any(later_contradictions(edits))
    edits, info = edit_stream(records, 3)
    assert [r["src"] for r in edits] == ["a?", "a2?", "b2?"] and info == {"skipped_empty_target": 1}
    with pytest.raises(ValueError, match="only 5 usable records"):
        edit_stream(records, 6, one_per_subject=True)


def test_summary_names_a_one_per_subject_stream():
    report = synthetic_report() | {"one_per_subject": True, "last_source_record": 195}
    assert "first record of each subject (records 0-195)" in summary_markdown(report)


def test_summary_names_the_rehearsal_setting():
    faithful = synthetic_report()
    faithful["config"]["rehearse"] = 0
    assert "no rehearsal (the faithful recipe)" in summary_markdown(faithful)
    rehearsed = synthetic_report()
    rehearsed["config"].update(rehearse=4, rehearse_weight=0.5, rehearse_select="overlap")
    rehearsed["mean_rehearsed"] = 3.25
    text = summary_markdown(rehearsed)
    assert "rehearsal of up to 4 stored edits (chosen by overlap, weight 0.5)" in text
    assert "3.25 stored edits rehearsed per edit" in text
    assert "rehearsal" not in summary_markdown(synthetic_report())  # older reports: no setting shown
