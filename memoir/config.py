"""MemoirConfig: every knob of the method, validated, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MemoirConfig", "CONFIG_FORMAT_VERSION", "KEY_AGGREGATIONS", "DECAY_SCOPES", "REHEARSE_SELECTIONS", "ANSWER_ENDS"]

CONFIG_FORMAT_VERSION = 1
KEY_AGGREGATIONS = ("mean_decentered", "mean", "last")
DECAY_SCOPES = ("all", "masked")
REHEARSE_SELECTIONS = ("overlap", "recent")
ANSWER_ENDS = ("eos", "none")
MEMORY_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class MemoirConfig:
    """Settings of one MEMOIR memory. ``None`` fields are filled from the model's preset at attach.

    Example:
        >>> config = MemoirConfig(irr_threshold=0.6)
        >>> MemoirConfig.from_json(config.to_json()) == config
        True
    """

    target_module: str | None = field(
        default=None, metadata={"help": "Dotted name of the edited MLP output projection; None = preset."}
    )
    top_k: int | None = field(default=None, metadata={"help": "Active positions per mask (k); None = preset."})
    irr_threshold: float | None = field(
        default=None, metadata={"help": "Overlap ratio tau at or above which a prompt uses the memory; None = preset."}
    )
    key_aggregation: str = field(
        default="mean_decentered", metadata={"help": "How prompt tokens form the key: " + "|".join(KEY_AGGREGATIONS)}
    )
    n_iter: int | None = field(default=None, metadata={"help": "Maximum optimisation steps per edit; None = preset."})
    lr: float | None = field(default=None, metadata={"help": "SGD learning rate; None = preset (reference: 1.0)."})
    weight_decay: float | None = field(
        default=None, metadata={"help": "SGD weight decay on the memory; None = preset (reference: 1e-5)."}
    )
    decay_scope: str = field(
        default="all",
        metadata={"help": "'all' decays the whole memory each step (reference); 'masked' only the edit's columns."},
    )
    rehearse: int | None = field(
        default=None,
        metadata={"help": "Stored edits rehearsed in each new edit's batch (0 = the faithful recipe); None = preset."},
    )
    rehearse_select: str = field(
        default="overlap",
        metadata={"help": "Which stored edits: 'overlap' (masks overlapping the new mask most) or 'recent'."},
    )
    rehearse_min_overlap: float = field(
        default=0.0, metadata={"help": "Only rehearse stored edits whose mask overlaps the new one at least this ratio."}
    )
    rehearse_weight: float = field(
        default=1.0, metadata={"help": "Loss weight of a rehearsed row relative to a row of the new edit."}
    )
    rehearse_prefixes: bool = field(
        default=False, metadata={"help": "Rehearse each stored edit with its context-prefix rows too (11 rows)."}
    )
    answer_end: str | None = field(
        default=None,
        metadata={"help": "'eos': teach the EOS / end-of-turn token after each target, so generate stops after "
                          "the answer; 'none': the faithful recipe; None = preset."},
    )
    train_chat: bool | None = field(
        default=None,
        metadata={"help": "Also train each edit as a chat turn (the prompt as the user message through the "
                          "tokenizer's chat template, the target as the assistant's answer) so it holds in chat; "
                          "ignored for a tokenizer without a chat template; None = preset."},
    )
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip per step (0 disables)."})
    early_stop_loss: float | None = field(
        default=None, metadata={"help": "Stop when the loss is at most this...; None = preset (reference: 0.02)."}
    )
    early_stop_delta: float | None = field(
        default=None, metadata={"help": "...and changed by at most this since the last step; None = preset "
                                        "(reference: 1e-4)."}
    )
    context_lengths: tuple[int, ...] = field(
        default=(5, 10), metadata={"help": "New-token counts of the generated context prefixes."}
    )
    context_seeds: tuple[str, ...] = field(
        default=("I", "You", "Because", "Yes", "Q: "), metadata={"help": "Seeds the context prefixes start from."}
    )
    num_background: int = field(default=100, metadata={"help": "Irrelevant sentences used for the background mean."})
    seed: int = field(default=0, metadata={"help": "Seed of the fixed permutation."})
    memory_dtype: str = field(default="float32", metadata={"help": "dtype of the residual memory W_m."})
    fast_edit: bool = field(
        default=True, metadata={"help": "Cache the edited block's input per edit; loss on target positions only."}
    )
    version: int = field(default=CONFIG_FORMAT_VERSION, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        _check(isinstance(self.context_lengths, (tuple, list)) and all(_is_int(n) for n in self.context_lengths),
               "context_lengths must be a sequence of ints")
        _check(isinstance(self.context_seeds, (tuple, list)) and all(isinstance(x, str) for x in self.context_seeds),
               "context_seeds must be a sequence of strings")
        self.context_lengths = tuple(self.context_lengths)
        self.context_seeds = tuple(self.context_seeds)
        _check(self.target_module is None or (isinstance(self.target_module, str) and self.target_module),
               "target_module must be a non-empty dotted module name or None")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k > 0), "top_k must be a positive int")
        _check(self.irr_threshold is None or (_is_number(self.irr_threshold) and 0.0 <= self.irr_threshold <= 1.0),
               "irr_threshold must be a number in [0, 1]")
        _check(self.key_aggregation in KEY_AGGREGATIONS, f"key_aggregation must be one of {KEY_AGGREGATIONS}")
        _check(self.n_iter is None or (_is_int(self.n_iter) and self.n_iter > 0), "n_iter must be a positive int")
        _check(self.lr is None or (_is_finite(self.lr) and self.lr > 0), "lr must be a finite number > 0")
        _check(self.weight_decay is None or (_is_finite(self.weight_decay) and self.weight_decay >= 0),
               "weight_decay must be a finite number >= 0")
        _check(self.decay_scope in DECAY_SCOPES, f"decay_scope must be one of {DECAY_SCOPES}")
        _check(self.rehearse is None or (_is_int(self.rehearse) and self.rehearse >= 0),
               "rehearse must be an int >= 0 or None")
        _check(self.rehearse_select in REHEARSE_SELECTIONS, f"rehearse_select must be one of {REHEARSE_SELECTIONS}")
        _check(_is_number(self.rehearse_min_overlap) and 0.0 <= self.rehearse_min_overlap <= 1.0,
               "rehearse_min_overlap must be a number in [0, 1]")
        _check(_is_finite(self.rehearse_weight) and self.rehearse_weight > 0,
               "rehearse_weight must be a finite number > 0")
        _check(isinstance(self.rehearse_prefixes, bool), "rehearse_prefixes must be a bool")
        _check(self.answer_end is None or self.answer_end in ANSWER_ENDS, f"answer_end must be one of {ANSWER_ENDS}")
        _check(self.train_chat is None or isinstance(self.train_chat, bool), "train_chat must be a bool or None")
        _check(_is_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip must be a finite number >= 0")
        _check(self.early_stop_loss is None or (_is_finite(self.early_stop_loss) and self.early_stop_loss >= 0),
               "early_stop_loss must be a finite number >= 0 or None")
        _check(self.early_stop_delta is None or (_is_finite(self.early_stop_delta) and self.early_stop_delta >= 0),
               "early_stop_delta must be a finite number >= 0 or None")
        _check(all(n > 0 for n in self.context_lengths), "context_lengths must be positive")
        _check(_is_int(self.num_background) and self.num_background > 0, "num_background must be a positive int")
        _check(_is_int(self.seed), "seed must be an int")
        _check(self.memory_dtype in MEMORY_DTYPES, f"memory_dtype must be one of {MEMORY_DTYPES}")
        _check(isinstance(self.fast_edit, bool), "fast_edit must be a bool")

    def to_dict(self) -> dict:
        """Plain-JSON dict of every field."""
        data = dataclasses.asdict(self)
        data["context_lengths"] = list(self.context_lengths)
        data["context_seeds"] = list(self.context_seeds)
        return data

    def to_json(self) -> str:
        """JSON text of this config."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> MemoirConfig:
        """Build from a dict; keys this version does not know are dropped with a warning."""
        if not isinstance(data, dict):
            raise TypeError(f"a MemoirConfig is built from a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"MemoirConfig: ignoring unknown keys {unknown} (written by a newer version?)", stacklevel=2)
        if int(data.get("version", CONFIG_FORMAT_VERSION)) > CONFIG_FORMAT_VERSION:
            warnings.warn(f"MemoirConfig: version {data['version']} is newer than {CONFIG_FORMAT_VERSION}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known and k != "version"})

    @classmethod
    def from_json(cls, text: str) -> MemoirConfig:
        """Parse JSON text written by :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write this config as JSON to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> MemoirConfig:
        """Read a config written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def replace(self, **changes) -> MemoirConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


def _is_number(value) -> bool:
    """A real number, not a bool (``True`` is an int to Python, never a setting here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"MemoirConfig: {message}")
