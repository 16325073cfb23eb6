"""Compare two eval reports of the same records, e.g. the fast path against the plain recipe.

    python -m memoir eval --edits 20 --out fast.json
    python -m memoir eval --edits 20 --no-fast-edit --out plain.json
    python -m memoir.compare fast.json plain.json

Prints Rel/Gen/Loc and seconds per edit of both, and the largest relative difference between their
loss trajectories (per edit, per iteration). Exits 1 when the runs edited different numbers of
records or took different numbers of steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["loss_differences", "main"]


def loss_differences(first: dict, second: dict) -> list[float]:
    """Per edit, the largest ``|a - b| / |b|`` over the iterations of the two loss trajectories."""
    runs_a, runs_b = first["per_record"]["losses"], second["per_record"]["losses"]
    if len(runs_a) != len(runs_b):
        raise ValueError(f"the reports hold {len(runs_a)} and {len(runs_b)} edits")
    differences = []
    for index, (a, b) in enumerate(zip(runs_a, runs_b, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"edit {index} took {len(a)} steps in one run and {len(b)} in the other")
        differences.append(max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)), default=0.0))
    return differences


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    first, second = (json.loads(Path(a).read_text(encoding="utf-8")) for a in args)
    for name, report in zip(args, (first, second), strict=True):
        print(f"{name}: Rel {report['rel']:.3f}  Gen {report['gen']:.3f}  Loc {report['loc']:.3f}  "
              f"{report['sec_per_edit']:.2f} s/edit (median {report['median_sec_per_edit']:.2f})")
    try:
        differences = loss_differences(first, second)
    except ValueError as error:
        print(f"not comparable: {error}", file=sys.stderr)
        return 1
    print(f"loss trajectories: largest relative difference {max(differences, default=0.0):.2e} "
          f"over {len(differences)} edits; speed-up {second['median_sec_per_edit'] / first['median_sec_per_edit']:.2f}x "
          "(median seconds per edit, second / first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
