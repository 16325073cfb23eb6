"""Locality decided by routing alone: how many unrelated prompts pass tau against the masks of T edits.

Loc can only change where the gate opens: an unrelated prompt whose overlap with its nearest stored
mask stays under tau runs the original layer bit for bit, whatever W_m holds. So the share of
unrelated prompts that pass tau bounds 1 - Loc from above, and needs no training: the stored masks
depend only on the edit prompts, mu, the permutation and k. This stores the T edits' masks as an edit
would (mu as the chosen flow gives it) and routes the T unrelated prompts of the same records.

    python tools/routing_locality.py --edits 100 --no-background   # mu from the bundled sentences
    python tools/routing_locality.py --edits 100                   # mu from ZsRE records 1000-1099

With no background given, ``attach`` + ``edit`` and the EasyEdit drop-in (``dir_background_features:
null``) both take mu from the bundled sentences, so one run covers both flows.
"""

from __future__ import annotations

import argparse
import json

import torch

import memoir
from memoir.background import GENERIC_SENTENCES
from memoir.cli import _default_data, _load_model
from memoir.evaluation import background_sentences, edit_stream, load_zsre


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--no-background", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = load_zsre(_default_data())
    edits, _ = edit_stream(records, args.edits)
    model, tokenizer = _load_model("smollm2", "float32")
    editor = memoir.attach(model, tokenizer)
    texts = (GENERIC_SENTENCES if args.no_background else background_sentences(records[1000:2000], 100))
    editor.fit_background(list(texts)[: editor.config.num_background])
    with torch.no_grad():
        for record in edits:
            editor.layer.add_mask(editor._prompt_mask(record["src"]))
    editor.sync_routing()
    unrelated = editor.route([r["loc"] for r in edits])
    own = editor.route([r["src"] for r in edits])
    report = {
        "edits": len(edits), "background": "bundled" if args.no_background else "zsre 1000-1099",
        "tau": editor.config.irr_threshold, "masks": editor.layer.num_masks,
        "unrelated_gated": sum(unrelated["gate"]) / len(edits), "unrelated_max_overlap": max(unrelated["overlap"]),
        "loc_lower_bound": 1 - sum(unrelated["gate"]) / len(edits),
        "edits_gated": sum(own["gate"]) / len(edits), "edits_min_overlap": min(own["overlap"]),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
