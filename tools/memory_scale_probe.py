"""How much of an edit's reliability survives a uniform shrink of W_m: the weight decay's share of forgetting.

SGD weight decay over the whole memory multiplies every stored edit by (1 - lr x wd) per step, so an
edit made early in a stream of T edits at s steps each ends up scaled by about
exp(-T x s x lr x wd) (SmolLM2 preset: lr 10, wd 1e-6, ~15 steps: 0.86 at T = 1000). This loads a
checkpoint or saved memory of ``eval`` (records 0..N-1 of the ZsRE dev file), scales W_m by each
factor and rescores Rel of those N edits, whole and by edit age (quarters, oldest first). A drop
here is what the decay alone would cost; the rest of the forgetting is later edits overwriting.

    python tools/memory_scale_probe.py CHECKPOINT_DIR --out scale.json
"""

from __future__ import annotations

import argparse
import json

import torch

from memoir.checkpoint import read_progress
from memoir.cli import _default_data, _load_model
from memoir.editor import load
from memoir.evaluation import _by_quarter, edit_stream, load_zsre, teacher_forced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("memory", help="an eval --checkpoint directory (or a saved memory with --edits)")
    parser.add_argument("--edits", type=int, default=None, help="edits in the memory (default: the checkpoint's)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    count = args.edits if args.edits is not None else int(read_progress(args.memory)["done"])
    edits, _ = edit_stream(load_zsre(_default_data()), count)
    model, tokenizer = _load_model("smollm2", "float32")
    editor = load(model, tokenizer, args.memory)
    stored = editor.layer.memory.detach().clone()
    result = {"memory": args.memory, "edits": count, "rel": {}, "rel_by_age_quarter": {}}
    for scale in args.scales:
        with torch.no_grad():
            editor.layer.memory.copy_(stored * scale)
        rel = teacher_forced(editor, [r["src"] for r in edits], [r["alt"] for r in edits]).accuracy
        result["rel"][str(scale)] = sum(rel) / len(rel)
        result["rel_by_age_quarter"][str(scale)] = _by_quarter(rel)
        print(f"scale {scale}: Rel {sum(rel) / len(rel):.3f}, by age", [round(x, 3) for x in _by_quarter(rel)])
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
