"""The ZsRE evaluation protocol (sequential edits, then teacher-forced Rel / Gen / Loc)."""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokens import batch_prompt_target, chat_prompt
from .training import EditResult

__all__ = ["load_zsre", "edit_records", "edit_stream", "first_of_each_subject", "background_sentences",
           "teacher_forced", "evaluate_sequential", "ScoredBatch", "curve_points", "later_contradictions",
           "chat_prompt", "chat_scores", "Baseline", "unedited_scores", "run_stream", "score_memory",
           "registered_results", "sweep_thresholds"]


def load_zsre(path) -> list[dict]:
    """ZsRE records (``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``, ...) from a JSON array."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ZsRE file at {path}: pass --data FILE or set MEMOIR_ZSRE_DATA (the records "
                                "ship in shared/data/zsre/ beside the repository)")
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path} is not a JSON array of ZsRE records")
    return records


def edit_records(records: list[dict], count: int) -> tuple[list[dict], int]:
    """The first ``count`` records with a non-empty target, and how many were skipped before them."""
    chosen, skipped = [], 0
    for record in records:
        if len(chosen) == count:
            break
        if _usable(record):
            chosen.append(record)
        else:
            skipped += 1
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} usable records, {count} edits requested")
    return chosen, skipped


def _usable(record: dict) -> bool:
    """A record can be an edit: non-empty prompt and target."""
    return bool(str(record.get("alt", "")).strip() and str(record.get("src", "")).strip())


def first_of_each_subject(records: list[dict]) -> list[int]:
    """Indices of the records that ask about a ``subject`` no earlier usable record asked about.

    ZsRE dev groups several paraphrased questions about one subject, each with its own new target,
    so a stream of consecutive records contradicts itself (see :func:`later_contradictions`).
    Keeping the first usable record of each subject gives a stream of the same kind of edits
    without contradictions. Unusable records (empty target) are kept, for :func:`edit_records` to
    skip and count; records without a ``subject`` are always kept.
    """
    seen, kept = set(), []
    for index, record in enumerate(records):
        subject = str(record.get("subject", "")).strip()
        if subject and subject in seen:
            continue
        if subject and _usable(record):
            seen.add(subject)
        kept.append(index)
    return kept


def edit_stream(records: list[dict], count: int, one_per_subject: bool = False) -> tuple[list[dict], dict]:
    """The ``count`` edits of an evaluation and how they were chosen (keys for the report).

    By default the first ``count`` usable records (:func:`edit_records`); with ``one_per_subject``
    only the first record of each subject (:func:`first_of_each_subject`), and the report names the
    last source record used.
    """
    if not one_per_subject:
        edits, skipped = edit_records(records, count)
        return edits, {"skipped_empty_target": skipped}
    source = first_of_each_subject(records)
    edits, skipped = edit_records([records[i] for i in source], count)
    return edits, {"skipped_empty_target": skipped, "one_per_subject": True,
                   "last_source_record": source[len(edits) + skipped - 1] if edits else None}


def background_sentences(records: list[dict], count: int) -> list[str]:
    """``loc + ' ' + loc_ans`` of the given records (irrelevant sentences), first ``count``."""
    texts = [f"{r['loc']} {r['loc_ans']}".strip() for r in records if str(r.get("loc", "")).strip()]
    return texts[:count]


@dataclass
class ScoredBatch:
    """Teacher-forced results of a list of (prompt, answer) pairs."""

    accuracy: list[float]  # per pair: fraction of answer tokens predicted (argmax)
    predictions: list[torch.Tensor]  # per pair: argmax token ids at the answer positions
    overlap: list[float]  # per pair: routing overlap ratio (0 with an empty bank)
    index: list[int]  # per pair: nearest stored mask (-1 with an empty bank)


@torch.no_grad()
def teacher_forced(editor, prompts: list[str], answers: list[str], batch_size: int = 32,
                   route_prompts: list[str] | None = None, separator: str = " ") -> ScoredBatch:
    """Score ``prompt + ' ' + answer`` with routing decided from the prompt tokens only, or, with
    ``route_prompts``, row i routed as ``route_prompts[i]`` alone (a chat-templated prompt by its
    user message, whose answer follows the template with ``separator=""``)."""
    result = ScoredBatch([], [], [], [])
    layer = editor.layer
    for start in range(0, len(prompts), batch_size):
        batch = batch_prompt_target(editor.tokenizer, prompts[start : start + batch_size],
                                    answers[start : start + batch_size], separator=separator).to(editor.device)
        routing = (editor.routed_as(route_prompts[start : start + batch_size]) if route_prompts is not None
                   else contextlib.nullcontext())
        with routing:
            logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  prompt_lengths=batch.prompt_lengths, use_cache=False).logits
        predicted = logits.argmax(dim=-1)
        for row in range(batch.input_ids.shape[0]):
            span = slice(int(batch.prompt_lengths[row]), int(batch.lengths[row]))
            want = batch.input_ids[row, span]
            got = predicted[row, span.start - 1 : span.stop - 1]
            result.predictions.append(got.cpu())
            result.accuracy.append(float((got == want).float().mean()) if want.numel() else 0.0)
        decision = editor.last_decision if layer.num_masks else None
        rows = batch.input_ids.shape[0]
        result.overlap += (decision.overlap.clamp_min(0).double() / layer.top_k).tolist() if decision else [0.0] * rows
        result.index += decision.index.tolist() if decision else [-1] * rows
    return result


def _agreement(edited: list[torch.Tensor], original: list[torch.Tensor]) -> list[float]:
    return [float((a == b).float().mean()) if a.numel() else 1.0 for a, b in zip(edited, original, strict=True)]


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def curve_points(total: int, count: int = 4) -> list[int]:
    """Edit counts at which to score the edits made so far: ``count`` evenly spaced, ending at ``total``."""
    if count <= 0 or total <= 0:
        return []
    return sorted({max(1, round(total * (i + 1) / count)) for i in range(count)})


def _score_prefix(editor, records: list[dict], baseline: Baseline, count: int) -> dict:
    """Rel/Gen/Loc of the first ``count`` records, as the memory stands now."""
    done = records[:count]
    rel = teacher_forced(editor, [r["src"] for r in done], [r["alt"] for r in done])
    gen = teacher_forced(editor, [r["rephrase"] for r in done], [r["alt"] for r in done])
    loc = _agreement(teacher_forced(editor, [r["loc"] for r in done], [r["loc_ans"] for r in done]).predictions,
                     baseline.loc.predictions[:count])
    return {"edits": count, "rel": _mean(rel.accuracy), "gen": _mean(gen.accuracy), "loc": _mean(loc)}


@dataclass
class Baseline:
    """The unedited model's scores of a stream's records (the memory off), computed once."""

    pre_rel: ScoredBatch
    pre_gen: ScoredBatch
    loc: ScoredBatch  # its predictions on the unrelated prompts are what Loc compares with


def unedited_scores(editor, records: list[dict]) -> Baseline:
    """:class:`Baseline` of ``records``: Rel, Gen and the unrelated prompts' predictions, memory off."""
    with editor.unedited():  # the unedited model, whatever the memory holds already
        return Baseline(teacher_forced(editor, [r["src"] for r in records], [r["alt"] for r in records]),
                        teacher_forced(editor, [r["rephrase"] for r in records], [r["alt"] for r in records]),
                        teacher_forced(editor, [r["loc"] for r in records], [r["loc_ans"] for r in records]))


def run_stream(editor, records: list[dict], background: list[str], baseline: Baseline, progress: bool = True,
               points: Sequence[int] = (), checkpoint_dir=None, checkpoint_every: int = 100
               ) -> tuple[list[EditResult], list[dict]]:
    """Fit mu (when the memory has none), apply every record as an edit in order, and score the
    edits made so far at each of ``points`` (edit counts < len(records)) while it goes on.

    With ``checkpoint_dir`` the edits are checkpointed there and a rerun resumes from it; the
    curve points scored so far are kept beside the checkpoint (``curve.json``) and carried over.
    Returns the edits' results and the curve points.
    """
    prompts, targets = [r["src"] for r in records], [r["alt"] for r in records]
    if background and not editor.layer.has_background:
        editor.fit_background(background[: editor.config.num_background])
    wanted = {p for p in points if 0 < p < len(records)}
    curve_file = Path(checkpoint_dir) / "curve.json" if checkpoint_dir is not None else None
    curve = _read_curve(curve_file)

    def score_point(done: int) -> None:
        if done in wanted:
            curve[:] = [p for p in curve if p["edits"] != done]
            curve.append(_score_prefix(editor, records, baseline, done))
            _write_curve(curve_file, curve)

    requests = [{"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True)]
    results = editor.edit_many(requests, progress=progress, checkpoint_dir=checkpoint_dir,
                               checkpoint_every=checkpoint_every, on_edit=score_point)
    return results, curve


def registered_results(editor, records: list[dict]) -> list[EditResult]:
    """For a loaded memory holding ``records``' edits: each edit's bank row from its registry."""
    return [EditResult(r["src"], r["alt"], [], _registered_row(editor, r["src"], r["alt"])) for r in records]


def score_memory(editor, records: list[dict], results: list[EditResult], baseline: Baseline,
                 curve: list[dict] = (), timed: bool = True) -> dict:
    """The report of the memory as it stands: ``rel``, ``gen``, ``loc``, ``avg``, ``pre_rel``,
    ``pre_gen``, ``edits``, ``sec_per_edit`` (NaN unless ``timed``: edits made in this run),
    ``overlap_*``, routing accuracy, Rel by edit age and by contradiction, ``curve`` (ending
    with this point) and ``per_record`` details."""
    rel = teacher_forced(editor, [r["src"] for r in records], [r["alt"] for r in records])
    gen = teacher_forced(editor, [r["rephrase"] for r in records], [r["alt"] for r in records])
    loc_after = teacher_forced(editor, [r["loc"] for r in records], [r["loc_ans"] for r in records])
    loc_scores = _agreement(loc_after.predictions, baseline.loc.predictions)
    own_rows = [r.mask_row for r in results]
    report = {
        "edits": len(records),
        "rel": _mean(rel.accuracy),
        "gen": _mean(gen.accuracy),
        "loc": _mean(loc_scores),
        "pre_rel": _mean(baseline.pre_rel.accuracy),
        "pre_gen": _mean(baseline.pre_gen.accuracy),
        # Each edit's own time (kept across a resume); NaN for a loaded memory, which made none here.
        "sec_per_edit": _mean(r.seconds for r in results) if timed else float("nan"),
        "median_sec_per_edit": statistics.median(r.seconds for r in results) if timed else float("nan"),
        "mean_iterations": _mean(r.iterations for r in results),
        "mean_final_loss": _mean(r.final_loss for r in results),
        "mean_rehearsed": _mean(r.rehearsed for r in results),
        "overlap_edit": _mean(rel.overlap),
        "overlap_rephrase": _mean(gen.overlap),
        "overlap_unrelated": _mean(loc_after.overlap),
        "edit_routed_to_own_mask": _mean(float(i == o) for i, o in zip(rel.index, own_rows, strict=True)),
        "rephrase_routed_to_own_mask": _mean(float(i == o) for i, o in zip(gen.index, own_rows, strict=True)),
        "unrelated_gated": _mean(float(o >= editor.config.irr_threshold) for o in loc_after.overlap),
        "masks": editor.layer.num_masks,
        "rel_by_age_quarter": _by_quarter(rel.accuracy),
        **_rel_by_contradiction(records, rel.accuracy),
        "per_record": {
            "rel": rel.accuracy, "gen": gen.accuracy, "loc": loc_scores,
            "overlap_edit": rel.overlap, "overlap_rephrase": gen.overlap, "overlap_unrelated": loc_after.overlap,
            "iterations": [r.iterations for r in results], "final_loss": [r.final_loss for r in results],
            "rehearsed": [r.rehearsed for r in results],
            "losses": [r.losses for r in results],
        },
    }
    report["avg"] = (report["rel"] + report["gen"] + report["loc"]) / 3
    final_point = {key: report[key] for key in ("edits", "rel", "gen", "loc")}
    report["curve"] = sorted(curve, key=lambda p: p["edits"]) + [final_point]
    return report


def evaluate_sequential(editor, records: list[dict], background: list[str], progress: bool = True,
                        apply_edits: bool = True, points: Sequence[int] = (), checkpoint_dir=None,
                        checkpoint_every: int = 100, baseline: Baseline | None = None) -> dict:
    """:func:`run_stream` then :func:`score_memory` (see both); with ``apply_edits=False`` the
    memory already holds the edits (a loaded one) and is scored as it is. ``baseline`` from
    :func:`unedited_scores` when the caller has it already."""
    baseline = baseline if baseline is not None else unedited_scores(editor, records)
    if not apply_edits:
        return score_memory(editor, records, registered_results(editor, records), baseline, timed=False)
    results, curve = run_stream(editor, records, background, baseline, progress, points, checkpoint_dir,
                                checkpoint_every)
    return score_memory(editor, records, results, baseline, curve)


def chat_scores(editor, records: list[dict]) -> dict:
    """Teacher-forced Rel / Gen / Loc with every prompt sent through the chat template as a user
    message, each routed by its user message (:meth:`MemoirEditor.routed_as`); the edits are the same."""
    template = [lambda r, key=key: chat_prompt(editor.tokenizer, r[key]) for key in ("src", "rephrase", "loc")]
    srcs, rephrases, locs = ([t(r) for r in records] for t in template)
    targets, loc_answers = [r["alt"] for r in records], [r["loc_ans"] for r in records]
    # The assistant's answer starts its turn right after the template's header: no space before it.
    with editor.unedited():
        loc_before = teacher_forced(editor, locs, loc_answers, separator="").predictions
    rel = teacher_forced(editor, srcs, targets, route_prompts=[r["src"] for r in records], separator="")
    gen = teacher_forced(editor, rephrases, targets, route_prompts=[r["rephrase"] for r in records], separator="")
    loc = teacher_forced(editor, locs, loc_answers, route_prompts=[r["loc"] for r in records], separator="")
    return {"chat_rel": _mean(rel.accuracy), "chat_gen": _mean(gen.accuracy),
            "chat_loc": _mean(_agreement(loc.predictions, loc_before))}


def _registered_row(editor, prompt: str, target: str) -> int:
    """The bank row of the active edit of ``prompt`` to ``target`` in the registry (-1 if none)."""
    rows = [r.mask_row for r in editor.find(prompt) if r.target == target]
    return rows[-1] if rows else -1


def _read_curve(path: Path | None) -> list[dict]:
    """Curve points saved beside a checkpoint by an earlier, interrupted run (none if unreadable)."""
    if path is None or not path.is_file():
        return []
    try:
        points = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return []
    return [p for p in points if isinstance(p, dict) and "edits" in p] if isinstance(points, list) else []


def _write_curve(path: Path | None, curve: list[dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(curve), encoding="utf-8")
    tmp.replace(path)


def sweep_thresholds(editor, records: list[dict], report: dict, baseline: Baseline,
                     taus: tuple[float, ...] = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)) -> list[dict]:
    """Rel/Gen/Loc of the same memory for several tau: routing is re-run, edits are not.

    ``report`` is :func:`evaluate_sequential`'s, scored at the layer's current tau, and
    ``baseline`` the unedited scores it was made with. The nearest mask
    does not depend on tau, only the gate (overlap / k >= tau) does, and each row routes on its own,
    so a row is scored again only where its gate differs from the report's; the others keep their
    scores (on the final T = 1000 memory the whole eval with the sweep took 30 min on one core; scoring
    every row at every tau had not finished after 83).
    """
    layer, original = editor.layer, editor.layer.irr_threshold
    has_masks = layer.num_masks > 0
    per_record = report["per_record"]
    sets = {  # name: prompts, answers, scores at the current tau, routing overlaps, reference predictions
        "rel": ([r["src"] for r in records], [r["alt"] for r in records], per_record["rel"],
                per_record["overlap_edit"], None),
        "gen": ([r["rephrase"] for r in records], [r["alt"] for r in records], per_record["gen"],
                per_record["overlap_rephrase"], None),
        "loc": ([r["loc"] for r in records], [r["loc_ans"] for r in records], per_record["loc"],
                per_record["overlap_unrelated"], baseline.loc.predictions),
    }
    rows = []
    try:
        for tau in taus:
            layer.irr_threshold = tau
            row = {"tau": tau}
            for name, (prompts, answers, scores, overlaps, before) in sets.items():
                # The same float64 comparison as the layer's gate (its integer threshold is derived from
                # it); with an empty bank no gate opens at any tau.
                flipped = [i for i, o in enumerate(overlaps) if (o >= tau) != (o >= original)] if has_masks else []
                row[name] = _mean(_rescored(editor, prompts, answers, scores, flipped, before))
            rows.append(row)
    finally:
        layer.irr_threshold = original
    return rows


def _rescored(editor, prompts, answers, scores, rows, before) -> list[float]:
    """``scores`` with ``rows`` scored again (accuracy, or agreement with ``before`` when given)."""
    scores = list(scores)
    if rows:
        scored = teacher_forced(editor, [prompts[i] for i in rows], [answers[i] for i in rows])
        values = scored.accuracy if before is None else _agreement(scored.predictions, [before[i] for i in rows])
        for i, value in zip(rows, values, strict=True):
            scores[i] = value
    return scores


def later_contradictions(records: list[dict]) -> list[bool]:
    """Per edit: does a later edit ask about the same ``subject`` with a different target?

    ZsRE groups several paraphrased questions about one subject, each with its own new target; the
    later edit of such a pair contradicts the earlier one on nearly the same prompt. Records
    without a ``subject`` are never counted as contradicted.
    """
    flags = []
    for index, record in enumerate(records):
        subject = str(record.get("subject", "")).strip()
        flags.append(bool(subject) and any(
            str(later.get("subject", "")).strip() == subject and later["alt"] != record["alt"]
            for later in records[index + 1 :]))
    return flags


def _rel_by_contradiction(records: list[dict], rel: list[float]) -> dict:
    """Rel of the edits contradicted by a later edit (see :func:`later_contradictions`) and of the rest."""
    flags = later_contradictions(records)
    contradicted = [r for r, flag in zip(rel, flags, strict=True) if flag]
    others = [r for r, flag in zip(rel, flags, strict=True) if not flag]
    return {"contradicted_later": len(contradicted),
            "rel_contradicted_later": _mean(contradicted), "rel_not_contradicted": _mean(others)}


def _by_quarter(values: list[float]) -> list[float]:
    """Mean of ``values`` in four consecutive quarters (oldest edits first)."""
    n = len(values)
    if n < 4:
        return [_mean(values)]
    return [_mean(values[n * q // 4 : n * (q + 1) // 4]) for q in range(4)]
