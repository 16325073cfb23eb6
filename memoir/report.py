"""Readable evaluation report: a Markdown summary and PNG plots, made from the eval JSON alone.

``write_report(report, directory)`` is a pure function of the dict that ``python -m memoir eval
--out`` writes (see :func:`memoir.evaluation.evaluate_sequential`); it writes

* ``summary.md``: before/after Rel, Gen, Loc, Avg, seconds per edit, routing statistics, the
  scores as edits accumulate and, when present, the threshold sweep;
* ``curve.png``: Rel / Gen / Loc of the edits made so far, as edits accumulate;
* ``overlap_histogram.png``: overlap ratios of edited, paraphrased and unrelated prompts with the
  threshold tau drawn;
* ``threshold_sweep.png``: Rel / Gen / Loc against tau (only with ``--sweep-threshold``).

From a results file: ``python -m memoir report results.json --out report/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["write_report", "load_results", "summary_markdown"]

_COLOURS = {"rel": "#1f77b4", "gen": "#ff7f0e", "loc": "#2ca02c"}
_NAMES = {"rel": "Reliability (Rel)", "gen": "Generalisation (Gen)", "loc": "Locality (Loc)"}
_OVERLAPS = (("overlap_edit", "edited prompts", "#1f77b4"),
             ("overlap_rephrase", "paraphrased prompts", "#ff7f0e"),
             ("overlap_unrelated", "unrelated prompts", "#7f7f7f"))


def load_results(path) -> dict:
    """Read an eval JSON file written by ``python -m memoir eval --out``."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no results file {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    _validate(report, str(path))
    return report


def _validate(report, where: str) -> None:
    if not isinstance(report, dict):
        raise ValueError(f"{where}: an eval report is a JSON object, got {type(report).__name__}")
    missing = [key for key in ("edits", "rel", "gen", "loc") if key not in report]
    if missing:
        raise ValueError(f"{where}: not a memoir eval report (missing {missing})")


def _tau(report: dict) -> float | None:
    tau = (report.get("config") or {}).get("irr_threshold")
    return float(tau) if isinstance(tau, (int, float)) else None


def _fmt(value, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _avg(*values) -> float:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if len(values) == 3 else float("nan")


def _generation_section(report: dict) -> list[str]:
    """Greedy generation after the edits (``eval --generate``): the four shares and a few examples;
    the chat-template scores (``--chat``) when present."""
    lines = []
    if "chat_rel" in report:
        chat = report.get("chat") or {}
        lines += ["## Through the chat template (routed by the user message)", "", "| Score | Value |", "|---|---:|",
                  f"| Rel (teacher-forced) | {_fmt(report['chat_rel'])} |", f"| Gen | {_fmt(report['chat_gen'])} |",
                  f"| Loc | {_fmt(report['chat_loc'])} |"]
        lines += [f"| {name} | {_fmt(chat[name])} |" for name in ("gen_exact_rel", "gen_exact_gen", "gen_clean",
                                                                   "gen_loc") if name in chat]
        lines.append("")
    if "gen_exact_rel" not in report:
        return lines
    lines += ["## Generation (greedy, target + 10 tokens)", "", "| Share | Value |", "|---|---:|",
             f"| continuation begins with the target, edited prompts | {_fmt(report['gen_exact_rel'])} |",
             f"| the same, paraphrases | {_fmt(report['gen_exact_gen'])} |",
             f"| of those, the answer ends cleanly | {_fmt(report['gen_clean'])} |",
             f"| unrelated prompts generate exactly as before | {_fmt(report['gen_loc'])} |", ""]
    examples = report.get("generate_examples") or []
    if examples:
        lines += ["| Prompt | Before | After |", "|---|---|---|"]
        lines += [f"| {_cell(e['prompt'])} | {_cell(e['before'])} | {_cell(e['after'])} |" for e in examples]
        lines.append("")
    return lines


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rehearsal_setting(config: dict) -> str | None:
    if config.get("rehearse") is None:
        return None
    if not config["rehearse"]:
        return "no rehearsal (the faithful recipe)"
    extras = [f"chosen by {config.get('rehearse_select', 'overlap')}"]
    if config.get("rehearse_min_overlap"):
        extras.append(f"overlap >= {config['rehearse_min_overlap']}")
    if config.get("rehearse_weight", 1.0) != 1.0:
        extras.append(f"weight {config['rehearse_weight']}")
    if config.get("rehearse_prefixes"):
        extras.append("with prefix rows")
    return f"rehearsal of up to {config['rehearse']} stored edits ({', '.join(extras)})"


def summary_markdown(report: dict, images: dict[str, str] | None = None) -> str:
    """The Markdown text of ``summary.md``; ``images`` maps ``curve`` / ``overlap_histogram`` /
    ``threshold_sweep`` to a relative PNG path, embedded in its section."""
    _validate(report, "report")
    images = images or {}
    config = report.get("config") or {}
    pre_rel, pre_gen = report.get("pre_rel"), report.get("pre_gen")
    lines = [f"# MEMOIR evaluation: {report.get('model', 'model')}, T = {report['edits']} sequential edits", ""]
    settings = [f"edited module `{config['target_module']}`" if config.get("target_module") else None,
                f"top_k {config['top_k']}" if config.get("top_k") is not None else None,
                f"tau {_fmt(_tau(report), 2)}" if _tau(report) is not None else None,
                f"n_iter {config['n_iter']}" if config.get("n_iter") is not None else None,
                f"lr {config['lr']}" if config.get("lr") is not None else None,
                f"weight decay {config['weight_decay']} ({config.get('decay_scope', 'all')})"
                if config.get("weight_decay") is not None else None,
                _rehearsal_setting(config),
                "the end of the answer taught (EOS after each target)" if config.get("answer_end") == "eos" else None]
    settings = [s for s in settings if s]
    if settings:
        lines += ["Settings: " + ", ".join(settings) + ".", ""]
    lines += ["| Metric | Before edits | After edits |", "|---|---:|---:|",
              f"| Rel | {_fmt(pre_rel)} | {_fmt(report['rel'])} |",
              f"| Gen | {_fmt(pre_gen)} | {_fmt(report['gen'])} |",
              f"| Loc | {_fmt(1.0)} | {_fmt(report['loc'])} |",
              f"| Avg | {_fmt(_avg(pre_rel, pre_gen, 1.0))} | {_fmt(report.get('avg', _avg(report['rel'], report['gen'], report['loc'])))} |",
              ""]
    timing = [f"{_fmt(report.get('sec_per_edit'), 2)} s per edit"]
    if "median_sec_per_edit" in report:
        timing.append(f"median {_fmt(report['median_sec_per_edit'], 2)} s")
    if "mean_iterations" in report:
        timing.append(f"{_fmt(report['mean_iterations'], 1)} iterations on average")
    if "mean_final_loss" in report:
        timing.append(f"final loss {_fmt(report['mean_final_loss'])} on average")
    if report.get("mean_rehearsed"):
        timing.append(f"{_fmt(report['mean_rehearsed'], 2)} stored edits rehearsed per edit on average")
    lines += ["Editing: " + ", ".join(timing) + ".", ""]
    lines += _generation_section(report)
    if report.get("skipped_empty_target"):
        lines += [f"{report['skipped_empty_target']} record(s) with an empty target were skipped.", ""]
    if report.get("one_per_subject"):
        lines += [f"Edit stream: the first record of each subject (records 0-{report['last_source_record']}), "
                  "so no edit contradicts another.", ""]
    routing = [(label, report.get(key)) for key, label, _ in _OVERLAPS if key in report]
    if routing or "overlap_histogram" in images:
        lines += ["## Routing", ""]
    if routing:
        lines += ["| Routing | Value |", "|---|---:|"]
        lines += [f"| mean overlap, {label} | {_fmt(value)} |" for label, value in routing]
        for key, label in (("edit_routed_to_own_mask", "edited prompts routed to their own mask"),
                           ("rephrase_routed_to_own_mask", "paraphrases routed to their edit's mask"),
                           ("unrelated_gated", "unrelated prompts passing tau")):
            if key in report:
                lines.append(f"| {label} | {_fmt(report[key])} |")
        if "masks" in report:
            lines.append(f"| masks stored | {report['masks']} |")
        lines.append("")
    if "overlap_histogram" in images:
        lines += [f"![Overlap ratios of edited, paraphrased and unrelated prompts]({images['overlap_histogram']})", ""]
    curve = report.get("curve") or []
    if curve or "curve" in images:
        lines += ["## Scores as edits accumulate", ""]
    if "curve" in images:
        lines += [f"![Rel, Gen and Loc as edits accumulate]({images['curve']})", ""]
    if curve:
        lines += [
                  "Each row scores the edits made so far, with the memory as it stood at that point.", "",
                  "| Edits | Rel | Gen | Loc |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['edits']} | {_fmt(p.get('rel'))} | {_fmt(p.get('gen'))} | {_fmt(p.get('loc'))} |"
                  for p in curve]
        lines.append("")
    if report.get("rel_by_age_quarter") and len(report["rel_by_age_quarter"]) > 1:
        quarters = " / ".join(_fmt(v, 2) for v in report["rel_by_age_quarter"])
        lines += [f"Rel by edit age (quarters, oldest first): {quarters}.", ""]
    if report.get("contradicted_later"):
        lines += [f"Rel of the {report['contradicted_later']} edits that a later edit contradicts (same subject, "
                  f"another target): {_fmt(report['rel_contradicted_later'])}; of the other "
                  f"{report['edits'] - report['contradicted_later']}: {_fmt(report['rel_not_contradicted'])}.", ""]
    sweep = report.get("threshold_sweep") or []
    if sweep:
        lines += ["## Threshold sweep", "", "Same memory, routing redone for each tau.", "",
                  "| tau | Rel | Gen | Loc | Avg |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {_fmt(r['tau'], 2)} | {_fmt(r['rel'])} | {_fmt(r['gen'])} | {_fmt(r['loc'])} | "
                  f"{_fmt(_avg(r['rel'], r['gen'], r['loc']))} |" for r in sweep]
        lines.append("")
    if "threshold_sweep" in images:
        lines += [f"![Rel, Gen and Loc against tau]({images['threshold_sweep']})", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_curve(report: dict, path: Path) -> None:
    plt = _pyplot()
    curve = report.get("curve") or [{k: report[k] for k in ("edits", "rel", "gen", "loc")}]
    xs = [p["edits"] for p in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key in ("rel", "gen", "loc"):
        ax.plot(xs, [p.get(key, float("nan")) for p in curve], marker="o", color=_COLOURS[key], label=_NAMES[key])
    ax.set_xlabel("Sequential edits applied (T)")
    ax.set_ylabel("Score (teacher-forced token accuracy)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlim(0, max(xs) * 1.05 if xs else 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(f"{report.get('model', 'model')}: scores of the edits made so far")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_histogram(report: dict, path: Path) -> None:
    plt = _pyplot()
    per_record = report.get("per_record") or {}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    bins = [i / 40 for i in range(41)]
    plotted = False
    for key, label, colour in _OVERLAPS:
        values = [v for v in per_record.get(key, []) if isinstance(v, (int, float)) and not math.isnan(v)]
        if values:
            ax.hist(values, bins=bins, alpha=0.55, color=colour, edgecolor=colour, label=f"{label} (n={len(values)})")
            plotted = True
    tau = _tau(report)
    if tau is not None:
        ax.axvline(tau, color="#d62728", linestyle="--", linewidth=2, label=f"threshold tau = {tau:.2f}")
        ax.annotate(f"tau = {tau:.2f}", xy=(tau, 0.97), xycoords=("data", "axes fraction"), xytext=(4, 0),
                    textcoords="offset points", color="#d62728", va="top", fontweight="bold")
    if not plotted:
        ax.text(0.5, 0.5, "no per-record overlaps in this report", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Overlap ratio with the nearest stored mask (|q AND m| / k)")
    ax.set_ylabel("Number of prompts")
    ax.set_title("Routing: prompts at or above tau use the memory")
    ax.legend(loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_sweep(report: dict, path: Path) -> None:
    plt = _pyplot()
    sweep = report["threshold_sweep"]
    taus = [r["tau"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key in ("rel", "gen", "loc"):
        ax.plot(taus, [r[key] for r in sweep], marker="o", color=_COLOURS[key], label=_NAMES[key])
    tau = _tau(report)
    if tau is not None:
        ax.axvline(tau, color="#d62728", linestyle="--", linewidth=1.5, label=f"configured tau = {tau:.2f}")
    ax.set_xlabel("Threshold tau (overlap ratio)")
    ax.set_ylabel("Score (teacher-forced token accuracy)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title("Choosing tau: same memory, routing redone")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, directory) -> dict[str, Path]:
    """Write ``summary.md``, ``curve.png``, ``overlap_histogram.png`` (and ``threshold_sweep.png``
    when the report has a sweep) into ``directory``; returns ``{name: path}``.

    Only reads ``report`` (the eval JSON as a dict); nothing is recomputed.
    """
    _validate(report, "report")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"curve": directory / "curve.png", "overlap_histogram": directory / "overlap_histogram.png"}
    _plot_curve(report, paths["curve"])
    _plot_histogram(report, paths["overlap_histogram"])
    images = {"curve": "curve.png", "overlap_histogram": "overlap_histogram.png"}
    if report.get("threshold_sweep"):
        paths["threshold_sweep"] = directory / "threshold_sweep.png"
        _plot_sweep(report, paths["threshold_sweep"])
        images["threshold_sweep"] = "threshold_sweep.png"
    paths["summary"] = directory / "summary.md"
    paths["summary"].write_text(summary_markdown(report, images) + "\n", encoding="utf-8")
    return paths
