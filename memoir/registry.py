"""The edit registry: one record per edit, in order, saved with the memory.

A record says what was asked (prompt, target), when (UTC), how training went (iterations, final
loss, seconds, rows rehearsed), where its mask lives (bank row, whether it added the row) and its
status: ``active``, ``withdrawn``, or ``replaced`` (by a later edit of the same prompt).

Routing reads one thing from the registry: which bank rows are *withdrawn*, i.e. have at least one
record and no active one. A prompt whose nearest stored mask is such a row gets the original model
(the row stays in the bank so that no other prompt's nearest mask changes). Rows without any
record (edits made before the registry existed) always route.

Only plain JSON is stored (in the memory file's header): nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["EditRecord", "EditRegistry", "STATUSES", "read_edits_file", "utc_now"]

STATUSES = ("active", "withdrawn", "replaced")


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-07T11:20:57Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class EditRecord:
    """One edit as the registry keeps it (immutable: the registry replaces a record to change it)."""

    index: int  # position in edit order, 0-based (editor.edits[index])
    prompt: str
    target: str
    time: str  # UTC, ISO 8601
    iterations: int
    final_loss: float
    seconds: float
    mask_row: int  # bank row of the edit's mask
    new_mask: bool  # False when an identical mask was already stored
    status: str = "active"  # one of STATUSES
    replaced_by: int | None = None  # index of the edit that replaced this one
    rehearsed: int = 0  # stored edits rehearsed while training this one

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def status_text(self) -> str:
        """``active``, ``withdrawn`` or ``replaced by edit N``."""
        return f"replaced by edit {self.replaced_by}" if self.status == "replaced" else self.status

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditRecord:
        """Build from :meth:`to_dict`'s output; raises ``ValueError`` for a malformed record."""
        if not isinstance(data, dict):
            raise ValueError(f"an edit record is a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            record = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as error:
            raise ValueError(f"malformed edit record {data}: {error}") from error
        _check_record(record)
        return record


def _check_record(record: EditRecord) -> None:
    checks = (
        (isinstance(record.index, int) and record.index >= 0, "index must be an int >= 0"),
        (isinstance(record.prompt, str) and isinstance(record.target, str), "prompt and target must be strings"),
        (isinstance(record.mask_row, int) and record.mask_row >= 0, "mask_row must be an int >= 0"),
        (record.status in STATUSES, f"status must be one of {STATUSES}"),
        ((record.status == "replaced") == isinstance(record.replaced_by, int), "replaced_by goes with 'replaced'"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(f"edit record {record.index}: {message}")


class EditRegistry:
    """The ordered records of a memory's edits, and which bank rows they keep routing.

    ``unrecorded`` counts edits stored in the memory before it had a registry (older files): their
    masks always route and they cannot be withdrawn or rehearsed.
    """

    def __init__(self, records: Iterable[EditRecord] = (), unrecorded: int = 0) -> None:
        self._records: list[EditRecord] = list(records)
        self.unrecorded = int(unrecorded)
        for position, record in enumerate(self._records):
            if record.index != position:
                raise ValueError(f"edit record {position} has index {record.index}: records must be in edit order")
        # Indexes of the active records, kept in step, so that lookups per edit do not scan a
        # stream of 100k records: bank row -> record indices, prompt -> record indices.
        self._active_by_row: dict[int, list[int]] = {}
        self._active_by_prompt: dict[str, list[int]] = {}
        self._inactive = 0
        self._recorded_rows: set[int] = set()
        for record in self._records:
            self._index_active(record)

    def _index_active(self, record: EditRecord) -> None:
        self._recorded_rows.add(record.mask_row)
        self._inactive += not record.active
        if record.active:
            self._active_by_row.setdefault(record.mask_row, []).append(record.index)
            self._active_by_prompt.setdefault(record.prompt, []).append(record.index)

    def _unindex(self, record: EditRecord) -> None:
        self._inactive += 1
        for table, key in ((self._active_by_row, record.mask_row), (self._active_by_prompt, record.prompt)):
            table[key].remove(record.index)
            if not table[key]:
                del table[key]

    # ------------------------------------------------------------------------------- reading
    @property
    def records(self) -> tuple[EditRecord, ...]:
        """Every record, in edit order (a read-only snapshot)."""
        return tuple(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> EditRecord:
        return self._records[index]

    def __iter__(self) -> Iterator[EditRecord]:
        return iter(tuple(self._records))

    def __eq__(self, other) -> bool:
        return isinstance(other, EditRegistry) and (self._records, self.unrecorded) == (other._records,
                                                                                        other.unrecorded)

    def find(self, prompt: str) -> list[EditRecord]:
        """The active records whose prompt is exactly ``prompt`` (at most one in normal use)."""
        return [self._records[i] for i in self._active_by_prompt.get(prompt, ())]

    def active_on_row(self, row: int) -> list[EditRecord]:
        """Active records whose mask is bank row ``row``, oldest first."""
        return [self._records[i] for i in self._active_by_row.get(row, ())]

    def rows_with_active_edits(self) -> int:
        """How many bank rows hold at least one active edit."""
        return len(self._active_by_row)

    def row_active(self, num_rows: int, device=None) -> torch.Tensor | None:
        """``[num_rows]`` bool, False for a withdrawn row; ``None`` when every row routes."""
        if self._inactive == 0:
            return None  # nothing withdrawn or replaced: the common case costs no scan
        dead = [row for row in self._recorded_rows if row not in self._active_by_row and row < num_rows]
        if not dead:
            return None
        active = torch.ones(num_rows, dtype=torch.bool)
        active[dead] = False
        return active.to(device) if device is not None else active

    # ------------------------------------------------------------------------------- changing
    def append(self, record: EditRecord) -> None:
        """Add the record of a new edit (its index must be the next one)."""
        if record.index != len(self._records):
            raise ValueError(f"the next edit record has index {len(self._records)}, got {record.index}")
        _check_record(record)
        self._records.append(record)
        self._index_active(record)

    def next_index(self) -> int:
        return len(self._records)

    def withdraw(self, index: int) -> EditRecord:
        """Mark edit ``index`` withdrawn; returns the new record. Only an active edit can be withdrawn."""
        record = self._get(index)
        if not record.active:
            raise ValueError(f"edit {index} is {record.status_text}, not active: nothing to withdraw")
        self._unindex(record)
        self._records[index] = dataclasses.replace(record, status="withdrawn")
        return self._records[index]

    def mark_replaced(self, index: int, by: int) -> None:
        """Mark edit ``index`` replaced by edit ``by`` (a later edit of the same prompt)."""
        record = self._get(index)
        if record.active:
            self._unindex(record)
        self._records[index] = dataclasses.replace(record, status="replaced", replaced_by=by)

    def _get(self, index: int) -> EditRecord:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"an edit is named by its int index, got {type(index).__name__}")
        if not 0 <= index < len(self._records):
            raise IndexError(f"no edit {index}: the registry holds edits 0-{len(self._records) - 1}"
                             if self._records else f"no edit {index}: the registry is empty")
        return self._records[index]

    # ------------------------------------------------------------------------------- storage
    def to_json(self) -> str:
        """JSON text of the registry (stored in the memory file's header)."""
        return json.dumps({"unrecorded": self.unrecorded, "records": [r.to_dict() for r in self._records]},
                          ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EditRegistry:
        """Parse :meth:`to_json`'s text; raises ``ValueError`` when it is malformed."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"the edit registry is not valid JSON: {error}") from error
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ValueError("the edit registry must be an object with a 'records' list")
        unrecorded = data.get("unrecorded", 0)
        if not isinstance(unrecorded, int) or unrecorded < 0:
            raise ValueError(f"the edit registry's 'unrecorded' must be an int >= 0, got {unrecorded!r}")
        return cls([EditRecord.from_dict(r) for r in data["records"]], unrecorded)

    def export_lines(self) -> list[str]:
        """JSON Lines of the active edits (prompt, target, time), in edit order: a replayable stream."""
        return [json.dumps({"prompt": r.prompt, "target": r.target, "time": r.time}, ensure_ascii=False)
                for r in self._records if r.active]


def read_edits_file(path) -> list[dict]:
    """The edit requests of a JSON Lines file written by ``export_edits`` (``prompt``, ``target``, ...).

    Blank lines are skipped; a line that is not a JSON object raises ``ValueError`` naming its number.
    """
    requests = []
    text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from error
        if not isinstance(request, dict):
            raise ValueError(f"{path}, line {number}: an edit is a JSON object with 'prompt' and 'target'")
        requests.append(request)
    return requests
