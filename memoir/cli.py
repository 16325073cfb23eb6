"""Command line: ``python -m memoir demo``, ``eval``, ``edits`` and ``report``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

__all__ = ["main"]

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "zsre" / "zsre_dev_2000.json"


def _default_data() -> str:
    """``MEMOIR_ZSRE_DATA``, else ``shared/data/zsre/zsre_dev_2000.json`` beside or above the repo or cwd."""
    if os.environ.get("MEMOIR_ZSRE_DATA"):
        return os.environ["MEMOIR_ZSRE_DATA"]
    relative = Path("shared/data/zsre/zsre_dev_2000.json")
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for directory in (start, *start.parents):
            if (directory / relative).is_file():
                return str(directory / relative)
    return str(DEFAULT_DATA)


_MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")


def _load_model(name: str, dtype: str | None = None):
    import torch

    torch_dtype = getattr(torch, dtype) if dtype else None
    if name != "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, **({"dtype": torch_dtype} if torch_dtype else {}))
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.eval(), tokenizer
    from .models import load_smollm2

    return load_smollm2(torch_dtype)


def _config_from_args(args):
    from .config import MemoirConfig

    changes = {key: getattr(args, key) for key in ("target_module", "top_k", "irr_threshold", "n_iter", "lr",
                                                     "weight_decay", "decay_scope", "key_aggregation", "memory_dtype",
                                                     "num_background", "rehearse", "rehearse_select",
                                                     "rehearse_min_overlap", "rehearse_weight", "answer_end",
                                                     "early_stop_loss", "early_stop_delta")
               if getattr(args, key) is not None}
    if args.no_fast_edit:
        changes["fast_edit"] = False
    if args.rehearse_prefixes:
        changes["rehearse_prefixes"] = True
    if args.train_chat is not None:
        changes["train_chat"] = args.train_chat == "on"
    return MemoirConfig(**changes)


def _print_table(report: dict) -> None:
    rows = [("Rel", report["pre_rel"], report["rel"]), ("Gen", report["pre_gen"], report["gen"]),
            ("Loc", 1.0, report["loc"])]
    print(f"\n{'metric':<8}{'before':>8}{'after':>8}")
    for name, before, after in rows:
        print(f"{name:<8}{before:>8.3f}{after:>8.3f}")
    print(f"{'Avg':<8}{'':>8}{report['avg']:>8.3f}")
    print(f"edits {report['edits']} (skipped {report.get('skipped_empty_target', 0)} with an empty target), "
          f"{report['sec_per_edit']:.2f} s/edit, overlap edit/rephrase/unrelated "
          f"{report['overlap_edit']:.2f}/{report['overlap_rephrase']:.2f}/{report['overlap_unrelated']:.2f}")
    if report.get("one_per_subject"):
        print(f"edit stream: the first record of each subject, records 0-{report['last_source_record']}")
    if "gen_exact_rel" in report:
        print(f"generate: exact {report['gen_exact_rel']:.3f} (edited) / {report['gen_exact_gen']:.3f} (paraphrases), "
              f"clean {report['gen_clean']:.3f}, unrelated unchanged {report['gen_loc']:.3f}")
        for example in report["generate_examples"]:
            print(f"  {example['prompt']!r}: {example['before']!r} -> {example['after']!r}")
    if "chat_rel" in report:
        print(f"through the chat template: Rel {report['chat_rel']:.3f}, Gen {report['chat_gen']:.3f}, "
              f"Loc {report['chat_loc']:.3f}")
        chat = report.get("chat") or {}
        if chat:
            print(f"  generate: exact {chat['gen_exact_rel']:.3f} / {chat['gen_exact_gen']:.3f}, clean "
                  f"{chat['gen_clean']:.3f}, unrelated unchanged {chat['gen_loc']:.3f}")
    if report.get("contradicted_later"):
        print(f"Rel of the {report['contradicted_later']} edits contradicted by a later edit (same subject): "
              f"{report['rel_contradicted_later']:.3f}; of the others: {report['rel_not_contradicted']:.3f}")


def cmd_eval(args) -> int:
    import torch

    from .editor import attach, load
    from .evaluation import (
        background_sentences,
        curve_points,
        edit_stream,
        evaluate_sequential,
        load_zsre,
        sweep_thresholds,
        unedited_scores,
    )

    torch.manual_seed(0)
    records = load_zsre(args.data)
    # One record per subject spreads T edits over more records: keep them off the background's 1000-1999.
    pool = records[:1000] if args.one_per_subject and not args.loc_data else records
    edits, stream = edit_stream(pool, args.edits, one_per_subject=args.one_per_subject)
    loc_records = load_zsre(args.loc_data) if args.loc_data else records[1000:2000]
    model, tokenizer = _load_model(args.model, args.dtype)
    editor = load(model, tokenizer, args.load_memory) if args.load_memory else attach(model, tokenizer,
                                                                                       _config_from_args(args))
    if args.load_memory and args.irr_threshold is not None:
        editor.set_threshold(args.irr_threshold)
    background = [] if args.no_background else background_sentences(loc_records, editor.config.num_background)
    baseline = unedited_scores(editor, edits)
    report = evaluate_sequential(editor, edits, background,
                                 progress=not args.quiet, apply_edits=not args.load_memory,
                                 points=curve_points(len(edits), args.curve_points),
                                 checkpoint_dir=args.checkpoint, checkpoint_every=args.checkpoint_every,
                                 baseline=baseline)
    report.update(stream)
    report["config"] = editor.config.to_dict()
    report["model"] = args.model
    if args.sweep_threshold:
        report["threshold_sweep"] = sweep_thresholds(editor, edits, report, baseline)
    if args.generate:
        from .generation_eval import generation_scores

        report.update(generation_scores(editor, edits))
    if args.chat:
        from .evaluation import chat_scores
        from .generation_eval import generation_scores

        report.update(chat_scores(editor, edits))
        if args.generate:
            report["chat"] = generation_scores(editor, edits, chat=True)
    if args.save_memory:
        editor.save(args.save_memory)
    _print_table(report)
    if args.sweep_threshold:
        print("\ntau    Rel    Gen    Loc")
        for row in report["threshold_sweep"]:
            print(f"{row['tau']:.2f}  {row['rel']:.3f}  {row['gen']:.3f}  {row['loc']:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.report:
        _write_report(report, args.report)
    return 0


def _write_report(report: dict, directory) -> None:
    from .report import write_report

    for path in write_report(report, directory).values():
        print(f"wrote {path}")


def cmd_report(args) -> int:
    from .report import load_results

    _write_report(load_results(args.results), args.out)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.data, args.edits)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_registry_table(records) -> str:
    """The registry as a text table: index, status, time, prompt, target, final loss."""
    lines = [f"{'#':>5}  {'status':<20}{'time (UTC)':<22}{'prompt':<48}{'target':<28}{'loss':>8}"]
    for r in records:
        lines.append(f"{r.index:>5}  {r.status_text:<20}{r.time:<22}{_clip(r.prompt, 46):<48}"
                     f"{_clip(r.target, 26):<28}{r.final_loss:>8.4f}")
    return "\n".join(lines)


def cmd_edits(args) -> int:
    from .persistence import read_registry, write_registry

    try:
        registry = read_registry(args.memory)
    except (OSError, ValueError) as error:
        print(f"memoir edits: {error}", file=sys.stderr)
        return 2
    if registry.unrecorded:
        print(f"note: {registry.unrecorded} edits of this memory were saved before the edit registry and are not "
              "listed", file=sys.stderr)
    if args.withdraw is not None:
        try:
            registry.withdraw(args.withdraw)
        except (IndexError, ValueError) as error:
            print(f"memoir edits: {error}", file=sys.stderr)
            return 2
        write_registry(args.memory, registry)
        print(f"withdrew edit {args.withdraw} from {args.memory}", file=sys.stderr)
        registry = read_registry(args.memory)
    if args.export:
        from .persistence import atomic_write_text

        lines = registry.export_lines()
        atomic_write_text(Path(args.export), "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} active edits to {args.export}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_dict() for r in registry], indent=2, ensure_ascii=False))
    elif args.withdraw is None and not args.export:
        print(format_registry_table(registry.records))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import ANSWER_ENDS, DECAY_SCOPES, KEY_AGGREGATIONS, MEMORY_DTYPES, REHEARSE_SELECTIONS

    parser = argparse.ArgumentParser(prog="python -m memoir", description="MEMOIR lifelong model editing")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="edit a few ZsRE facts on SmolLM2 and show before/after")
    demo.add_argument("--data", default=_default_data(), help="ZsRE JSON file")
    demo.add_argument("--edits", type=int, default=4, help="number of facts to edit")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="sequential ZsRE evaluation (Rel/Gen/Loc)")
    ev.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face model directory")
    ev.add_argument("--data", default=_default_data(), help="ZsRE JSON file; edits are its first T usable records")
    ev.add_argument("--edits", "-T", type=int, default=100, help="number of sequential edits T")
    ev.add_argument("--one-per-subject", action="store_true",
                    help="edit only the first record of each subject (a stream without contradicting edits)")
    ev.add_argument("--loc-data", default=None, help="records for background sentences (default: records 1000-1999)")
    ev.add_argument("--out", default=None, help="write the JSON report here")
    ev.add_argument("--report", default=None, metavar="DIR",
                    help="also write summary.md, curve.png and overlap_histogram.png to this directory")
    ev.add_argument("--save-memory", default=None, help="save the edited memory to this directory")
    ev.add_argument("--load-memory", default=None, help="evaluate a saved memory instead of editing")
    ev.add_argument("--sweep-threshold", action="store_true", help="also report Gen/Loc for a range of tau")
    ev.add_argument("--curve-points", type=int, default=4,
                    help="score the edits made so far at this many evenly spaced points of the run (0: only at the end)")
    ev.add_argument("--checkpoint", default=None,
                    help="checkpoint the edits in this directory; rerunning the same command resumes from it")
    ev.add_argument("--checkpoint-every", type=int, default=50, help="edits between checkpoints")
    ev.add_argument("--no-fast-edit", action="store_true", help="plain recipe (full forward per iteration)")
    ev.add_argument("--target-module", default=None)
    ev.add_argument("--top-k", type=int, default=None)
    ev.add_argument("--irr-threshold", type=float, default=None)
    ev.add_argument("--n-iter", type=int, default=None)
    ev.add_argument("--lr", type=float, default=None)
    ev.add_argument("--weight-decay", type=float, default=None)
    ev.add_argument("--early-stop-loss", type=float, default=None, metavar="LOSS",
                    help="stop an edit once its loss is at most LOSS... (faithful recipe: 0.02; default: the preset)")
    ev.add_argument("--early-stop-delta", type=float, default=None, metavar="DELTA",
                    help="...and changed by at most DELTA in a step (faithful recipe: 1e-4; default: the preset)")
    ev.add_argument("--decay-scope", choices=DECAY_SCOPES, default=None)
    ev.add_argument("--key-aggregation", choices=KEY_AGGREGATIONS, default=None)
    ev.add_argument("--generate", action="store_true",
                    help="also score greedy generation: gen_exact_rel, gen_exact_gen, gen_clean, gen_loc")
    ev.add_argument("--chat", action="store_true",
                    help="also score every prompt sent through the chat template as a user message (routed by "
                         "that message): chat_rel, chat_gen, chat_loc, and with --generate the gen_* keys under chat")
    ev.add_argument("--answer-end", choices=ANSWER_ENDS, default=None,
                    help="'eos': teach the end of the answer after each target; 'none': the faithful recipe")
    ev.add_argument("--train-chat", choices=("on", "off"), default=None,
                    help="'on': also train each edit as a chat turn through the chat template (default: the preset)")
    ev.add_argument("--rehearse", type=int, default=None, metavar="R",
                    help="stored edits rehearsed per edit (0: the faithful recipe; default: the preset)")
    ev.add_argument("--rehearse-select", choices=REHEARSE_SELECTIONS, default=None)
    ev.add_argument("--rehearse-min-overlap", type=float, default=None, metavar="RATIO")
    ev.add_argument("--rehearse-weight", type=float, default=None)
    ev.add_argument("--rehearse-prefixes", action="store_true", help="rehearse with the context-prefix rows too")
    ev.add_argument("--no-background", action="store_true",
                    help="give no background sentences: mu comes from the bundled set, as for a user who gives none")
    ev.add_argument("--num-background", type=int, default=None,
                    help="irrelevant sentences averaged into the background mean mu (preset: 100)")
    ev.add_argument("--dtype", choices=_MODEL_DTYPES, default=None,
                    help="load the model in this dtype (float64 with --memory-dtype float64 compares editing "
                         "paths without float32 rounding)")
    ev.add_argument("--memory-dtype", choices=MEMORY_DTYPES, default=None)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    edits = sub.add_parser("edits", help="list, withdraw or export the edits of a saved memory")
    edits.add_argument("memory", metavar="DIR", help="a memory saved by editor.save or eval --save-memory")
    edits.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    edits.add_argument("--withdraw", type=int, default=None, metavar="N",
                       help="withdraw edit N (its prompt gets the original model back); rewrites the memory atomically")
    edits.add_argument("--export", default=None, metavar="FILE",
                       help="write the active edits as JSON Lines (replay with editor.edit_many(FILE))")
    edits.set_defaults(func=cmd_edits)

    rep = sub.add_parser("report", help="Markdown summary and plots from an eval JSON file")
    rep.add_argument("results", help="JSON written by `python -m memoir eval --out`")
    rep.add_argument("--out", required=True, metavar="DIR", help="directory for summary.md and the PNG plots")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import StreamTerminated

    try:
        return args.func(args)
    except StreamTerminated:
        # The edits done were checkpointed on the way out (edit_many); 128 + SIGTERM, as a shell reports it.
        where = getattr(args, "checkpoint", None)
        hint = f"; rerun the same command to resume from {where}" if where else ""
        print(f"memoir: stopped by SIGTERM{hint}", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
