"""EasyEdit drop-in: the reference MEMOIR plug-in's API on top of :class:`memoir.MemoirEditor`.

Code written for the reference editor keeps working with an import change::

    from memoir.easyedit import MEMOIRHyperParams, apply_memoir_to_model

    hparams = MEMOIRHyperParams.from_hparams("hparams/MEMOIR/llama3-8b")  # .yaml optional
    for request in requests:                                              # sequential editing
        editor, weights_copy = apply_memoir_to_model(model, tok, [request], hparams)
    out = editor(input_ids=ids, attention_mask=mask, last_prompt_token_loc_inference=last)
    weights_copy()                                                        # original layer back

Inside EasyEdit, :func:`register` adds ``MEMOIR`` to its algorithm table so
``BaseEditor.from_hparams(hparams).edit(..., sequential_edit=True)`` runs this implementation.

Background features (``dir_background_features``) are read from a ``.safetensors`` file holding a
``[N, D]`` tensor (the first ``num_background`` rows are averaged into mu). The reference's ``.pt``
files are pickles and are never loaded here; convert one once with
``python tools/convert_background_features.py features.pt features.safetensors`` (it loads the file
with ``torch.load(..., weights_only=True)``), or make a new file from your own irrelevant sentences
with :func:`compute_background_features` and :func:`save_background_features`.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import KEY_AGGREGATIONS, MemoirConfig
from .editor import MemoirEditor, attach, validate_request
from .routing import cached_length

__all__ = [
    "MEMOIRHyperParams",
    "MEMOIR",
    "apply_memoir_to_model",
    "tokenize",
    "compute_background_features",
    "save_background_features",
    "load_background_features",
    "convert_background_features",
    "register",
    "BACKGROUND_KEY",
]

LOG = logging.getLogger(__name__)

BACKGROUND_KEY = "background_features"
_HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams" / "MEMOIR"
_REQUIRED = ("alg_name", "model_name", "device", "inner_params", "edit_lr", "n_iter", "objective_optimization")
_OBJECTIVES = ("only_label",)


# ----------------------------------------------------------------------------------- hyper-parameters
@dataclass
class MEMOIRHyperParams:
    """The reference plug-in's hyper-parameters (same keys and defaults), validated.

    Extension keys (absent from the reference, optional): ``weight_decay`` (``None``: the model
    preset, 1e-5 as in the reference for its models), ``num_background`` (rows of the background
    feature file averaged into mu; the reference uses 100) and the rehearsal keys ``rehearse``
    (stored edits rehearsed per edit; default 0, the reference's recipe), ``rehearse_select``,
    ``rehearse_min_overlap``, ``rehearse_weight``, ``rehearse_prefixes``, ``answer_end``
    (default ``"none"``, the reference's recipe), ``train_chat`` (default false, the
    reference's recipe), ``early_stop_loss`` and ``early_stop_delta`` (default 0.02 and 1e-4, the
    reference's stop; see :class:`memoir.MemoirConfig`).
    """

    edit_lr: float
    n_iter: int
    objective_optimization: str
    inner_params: list[str]
    device: int | str | None
    alg_name: str
    model_name: str
    batch_size: int = 1
    max_length: int = 30
    model_parallel: bool = False
    use_chat_template: bool = False
    top_k: int = 4096
    irr_threshold: float = 0.4
    prompt_feature_agg: str = "mean_decentered"
    dir_background_features: str | None = None
    RUN_SAVE_BACKGROUND_FEATURES: bool = False
    dir_to_save_background_features: str | None = None
    weight_decay: float | None = None
    num_background: int = 100
    rehearse: int = 0
    rehearse_select: str = "overlap"
    rehearse_min_overlap: float = 0.0
    rehearse_weight: float = 1.0
    rehearse_prefixes: bool = False
    answer_end: str = "none"
    train_chat: bool = False
    early_stop_loss: float = 0.02
    early_stop_delta: float = 1e-4

    def __post_init__(self) -> None:
        if self.alg_name != "MEMOIR":
            raise ValueError(f"MEMOIRHyperParams: alg_name must be 'MEMOIR', got {self.alg_name!r}")
        self.edit_lr = _number(self.edit_lr, "edit_lr")
        self.irr_threshold = _number(self.irr_threshold, "irr_threshold")
        if self.weight_decay is not None:
            self.weight_decay = _number(self.weight_decay, "weight_decay")
        self.early_stop_loss = _number(self.early_stop_loss, "early_stop_loss")
        self.early_stop_delta = _number(self.early_stop_delta, "early_stop_delta")
        for name in ("n_iter", "top_k", "batch_size", "max_length", "num_background"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MEMOIRHyperParams: {name} must be a positive int, got {value!r}")
        if isinstance(self.inner_params, str):
            self.inner_params = [self.inner_params]
        if not isinstance(self.inner_params, list) or not self.inner_params or \
                not all(isinstance(p, str) and p for p in self.inner_params):
            raise ValueError("MEMOIRHyperParams: inner_params must be a non-empty list of parameter names, "
                             f"e.g. ['model.layers[27].mlp.down_proj.weight'], got {self.inner_params!r}")
        if self.objective_optimization not in _OBJECTIVES:
            raise ValueError(f"MEMOIRHyperParams: objective_optimization {self.objective_optimization!r} is not "
                             f"supported (supported: {list(_OBJECTIVES)}: the loss is on the target tokens)")
        if self.prompt_feature_agg not in KEY_AGGREGATIONS:
            raise ValueError(f"MEMOIRHyperParams: prompt_feature_agg must be one of {list(KEY_AGGREGATIONS)}, "
                             f"got {self.prompt_feature_agg!r}")
        if not 0.0 <= self.irr_threshold <= 1.0:
            raise ValueError(f"MEMOIRHyperParams: irr_threshold must be in [0, 1], got {self.irr_threshold}")
        if self.batch_size != 1:
            raise ValueError("MEMOIRHyperParams: batch_size must be 1 (MEMOIR edits one request at a time)")
        if self.RUN_SAVE_BACKGROUND_FEATURES and not self.dir_to_save_background_features:
            raise ValueError("MEMOIRHyperParams: RUN_SAVE_BACKGROUND_FEATURES needs dir_to_save_background_features")

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path | None = None, config: dict | None = None
                     ) -> MEMOIRHyperParams:
        """Read a yaml file (the ``.yaml`` suffix may be left out) or take a ``config`` dict.

        A bare name such as ``"smollm2-135m"`` that is not a file is also looked up in this
        repository's ``hparams/MEMOIR/``. Unknown keys and missing required keys raise a
        ``ValueError`` that names them.
        """
        if (hparams_name_or_path is None) == (config is None):
            raise ValueError("MEMOIRHyperParams.from_hparams needs exactly one of hparams_name_or_path or config")
        if config is None:
            path = _find_yaml(hparams_name_or_path)
            import yaml

            with open(path, encoding="utf-8") as stream:
                config = yaml.safe_load(stream)
            if not isinstance(config, dict):
                raise ValueError(f"{path} does not hold a mapping of hyper-parameters")
            where = str(path)
        else:
            where = "config"
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"MEMOIRHyperParams ({where}): unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = [key for key in _REQUIRED if key not in config]
        if missing:
            raise ValueError(f"MEMOIRHyperParams ({where}): missing required key(s) {missing}")
        if config["alg_name"] != "MEMOIR":
            raise ValueError(f"MEMOIRHyperParams can not load from {where}: alg_name is {config['alg_name']!r}, "
                             "expected 'MEMOIR'")
        return cls(**config)

    def to_dict(self) -> dict:
        """The hyper-parameters as a plain dict (the yaml keys)."""
        return dataclasses.asdict(self)

    @property
    def target_module(self) -> str:
        """Dotted module name of ``inner_params[0]``: brackets to dots, ``.weight``/``.bias`` dropped."""
        name = re.sub(r"\[(\d+)\]", r".\1", self.inner_params[0])
        return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name

    def to_memoir_config(self, base: MemoirConfig | None = None) -> MemoirConfig:
        """The :class:`MemoirConfig` these hyper-parameters describe (other fields from ``base``)."""
        changes = dict(target_module=self.target_module, top_k=self.top_k, irr_threshold=self.irr_threshold,
                       key_aggregation=self.prompt_feature_agg, n_iter=self.n_iter, lr=self.edit_lr,
                       num_background=self.num_background, rehearse=self.rehearse,
                       rehearse_select=self.rehearse_select, rehearse_min_overlap=self.rehearse_min_overlap,
                       rehearse_weight=self.rehearse_weight, rehearse_prefixes=self.rehearse_prefixes,
                       answer_end=self.answer_end, train_chat=self.train_chat,
                       early_stop_loss=self.early_stop_loss, early_stop_delta=self.early_stop_delta)
        if self.weight_decay is not None:
            changes["weight_decay"] = self.weight_decay
        return (base or MemoirConfig()).replace(**changes)


def _number(value, name: str) -> float:
    """yaml reads ``1e-5`` as a string; accept it as the reference's HyperParams does."""
    if isinstance(value, bool):
        raise ValueError(f"MEMOIRHyperParams: {name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"MEMOIRHyperParams: {name} must be a number, got {value!r}") from None


def _find_yaml(name) -> Path:
    path = Path(name)
    candidates = [path] if path.suffix in (".yaml", ".yml") else [path.with_name(path.name + ".yaml"), path]
    if not path.is_absolute() and len(path.parts) == 1:
        candidates += [_HPARAMS_DIR / c.name for c in candidates]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no hyper-parameter file {name!r} (tried {[str(c) for c in candidates]})")


# ----------------------------------------------------------------------------------- background features
def load_background_features(path, dim: int | None = None) -> torch.Tensor:
    """The ``[N, D]`` float tensor stored in a ``.safetensors`` file (key ``background_features``,
    or the file's only tensor). A ``.pt`` file is refused: convert it first (module docstring)."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        raise ValueError(f"{path} is a pickle file, which MEMOIR never loads; convert it once with "
                         f"`python tools/convert_background_features.py {path} {path.with_suffix('.safetensors')}`"
                         " and point dir_background_features at the .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"background features file {path} does not exist")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if BACKGROUND_KEY in tensors:
        features = tensors[BACKGROUND_KEY]
    elif len(tensors) == 1:
        features = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path} holds tensors {sorted(tensors)}; expected one named {BACKGROUND_KEY!r}")
    return _check_features(features, dim, str(path))


def _check_features(features, dim: int | None, where: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise ValueError(f"{where}: background features must be a float tensor")
    if features.dim() == 1:
        features = features[None]
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"{where}: background features must be [N, D] with N >= 1, got {tuple(features.shape)}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{where}: background features have D = {features.shape[1]}, the edited layer has {dim}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{where}: background features contain NaN or inf")
    return features


def save_background_features(features: torch.Tensor, path) -> None:
    """Write ``[N, D]`` background features to a ``.safetensors`` file (key ``background_features``)."""
    from safetensors.torch import save_file

    features = _check_features(features, None, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({BACKGROUND_KEY: features.detach().to("cpu", torch.float32).contiguous()}, str(path))


def convert_background_features(source, destination) -> torch.Tensor:
    """Convert the reference's ``.pt`` background features to ``.safetensors`` (one-off).

    The ``.pt`` file is read with ``torch.load(weights_only=True)``: only tensors are accepted,
    no code from the file can run. Returns the features.
    """
    loaded = torch.load(str(source), map_location="cpu", weights_only=True)
    if isinstance(loaded, dict):
        tensors = [v for v in loaded.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{source}: expected one tensor, found keys {sorted(loaded)}")
        loaded = tensors[0]
    if isinstance(loaded, (list, tuple)) and loaded and all(isinstance(t, torch.Tensor) for t in loaded):
        loaded = torch.cat([t.reshape(1, -1) if t.dim() == 1 else t for t in loaded])
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"{source}: expected a tensor of background features, got {type(loaded).__name__}")
    features = _check_features(loaded.float(), None, str(source))
    save_background_features(features, destination)
    return features


@torch.no_grad()
def compute_background_features(model, tok, texts, hparams: MEMOIRHyperParams | None = None,
                                batch_size: int = 16) -> torch.Tensor:
    """Keys (mean edited-layer input over all tokens) of irrelevant sentences, ``[N, D]`` on CPU.

    The rows are what ``dir_background_features`` expects; mu is their mean. Uses the module of
    ``hparams`` (or the model's preset), or the memory already attached to ``model``; the model is
    left unchanged.
    """
    texts = list(texts)
    existing = getattr(model, "_memoir_editor", None)
    if isinstance(existing, MemoirEditor):
        return existing.collect_keys(texts, batch_size).cpu()
    config = hparams.to_memoir_config() if hparams is not None else None
    editor = attach(model, tok, config)
    try:
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("compute_background_features needs non-empty sentences")
        return editor.collect_keys(texts, batch_size).cpu()
    finally:
        editor.detach()


# ----------------------------------------------------------------------------------- tokenisation
def tokenize(requests: list[dict], tok, hparams: MEMOIRHyperParams, device=None) -> dict:
    """The reference's training tokens for ``requests``: ``prompt + ' ' + target_new`` rows, then
    each request's ``loc_prompt``; ``labels`` are -100 on prompt tokens and padding.

    Kept for API parity (``edit(config, tokens)``); :meth:`MEMOIR.edit` builds its own batch.
    """
    prompts, targets = [], []
    for index, request in enumerate(requests):
        prompt, target = _request_pair(request, index)
        prompts.append(_templated(tok, prompt, hparams))
        targets.append(target)
    loc = [r["loc_prompt"] for r in requests if isinstance(r.get("loc_prompt"), str) and r["loc_prompt"].strip()]
    from .tokens import batch_prompt_target

    # A loc_prompt row is a prompt with an empty target: every label of it is -100.
    batch = batch_prompt_target(tok, prompts + loc, targets + [""] * len(loc))
    labels = batch.input_ids.clone()
    positions = torch.arange(labels.shape[1])
    labels[(positions[None] < batch.prompt_lengths[:, None]) | (batch.attention_mask == 0)] = -100
    tokens = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}
    if device is not None:
        tokens = {key: value.to(device) for key, value in tokens.items()}
    return tokens


def _templated(tok, prompt: str, hparams: MEMOIRHyperParams | None) -> str:
    if hparams is None or not hparams.use_chat_template:
        return prompt
    if not getattr(tok, "chat_template", None):
        raise ValueError("use_chat_template is set but the tokenizer has no chat template")
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def _request_pair(request, index: int) -> tuple[str, str]:
    """``(prompt, target_new)`` of an EasyEdit request; its one-element lists are unwrapped."""
    if isinstance(request, dict):
        request = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in request.items()}
    return validate_request(request, index)


def _pairs_from_tokens(tok, tokens: dict) -> list[tuple[str, str]]:
    """Recover ``(prompt, target)`` from reference-format tokens (row 0 only: one edit per call)."""
    ids, labels = tokens["input_ids"][0].cpu(), tokens["labels"][0].cpu()
    mask = tokens.get("attention_mask")
    real = mask[0].cpu().bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    prompt = tok.decode(ids[real & (labels == -100)], skip_special_tokens=True).strip()
    target = tok.decode(labels[real & (labels != -100)], skip_special_tokens=True).strip()
    if not prompt or not target:
        raise ValueError("could not recover the prompt and target from tokens (labels must be -100 on the "
                         "prompt and the target ids elsewhere); pass requests=[...] instead")
    return [(prompt, target)]


# ----------------------------------------------------------------------------------- the editor
class _Restore:
    """``weights_copy``: calling it puts the original layer back.

    It also behaves as an empty mapping whose ``items()`` restores first, so EasyEdit's generic
    restore loop (``for k, v in weights_copy.items(): ...``, used between non-sequential edits) resets
    the memory instead of failing.
    """

    def __init__(self, editor: MEMOIR) -> None:
        self._editor = editor

    def __call__(self) -> None:
        self._editor.reset_layer()

    def items(self):
        self._editor.reset_layer()
        return iter(())

    def keys(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"weights_copy(restores {self._editor.layer_name})"


class MEMOIR:
    """The reference's ``MEMOIR`` editor object, backed by a :class:`memoir.MemoirEditor`.

    Callable like the model; ``last_prompt_token_loc_inference`` (per row: index of the last prompt
    token in the padded input) limits each row's routing key to its prompt tokens. Each row routes
    on its own, padding is taken from ``attention_mask``, ``generate`` works (the decision made at
    prefill is kept for every decode step), and an empty memory is the original model.

    Args:
        config: :class:`MEMOIRHyperParams`.
        model: the Hugging Face causal LM (edited in place).
        device: ignored (the memory lives on the edited layer's device); kept for the signature.
        tokenizer: the model's tokenizer (required: the reference took it only at ``tokenize``).
    """

    def __init__(self, config: MEMOIRHyperParams, model, device=None, tokenizer=None) -> None:
        if not isinstance(config, MEMOIRHyperParams):
            raise TypeError(f"config must be MEMOIRHyperParams, got {type(config).__name__}")
        if tokenizer is None:
            raise TypeError("MEMOIR needs the model's tokenizer: MEMOIR(config, model, tokenizer=tok)")
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.layer = config.target_module
        # The module's own name, the last part of its dotted path ("down_proj"), an attribute the
        # reference editor object also has; a name without a dot stays whole (rpartition's third slot).
        self.layer_name = self.layer.rpartition(".")[2]
        existing = getattr(model, "_memoir_editor", None)
        if isinstance(existing, MemoirEditor):
            self.editor = existing
            self._check_compatible(config)
            layer = existing.layer
            if config.dir_background_features and not layer.has_background and not layer.num_masks:
                self._load_background(config)
        else:
            self.editor = attach(model, tokenizer, config.to_memoir_config())
            if config.dir_background_features:
                try:
                    self._load_background(config)
                except BaseException:
                    self.editor.detach()  # a bad file leaves the model as it was
                    raise
        self._saved_features: list[torch.Tensor] = getattr(self.editor, "_easyedit_saved_features", [])
        self.editor._easyedit_saved_features = self._saved_features

    # ------------------------------------------------------------------------------ state
    def _load_background(self, config: MEMOIRHyperParams) -> None:
        features = load_background_features(config.dir_background_features, self.editor.layer.in_features)
        self._set_background(features[: config.num_background])

    def _set_background(self, features: torch.Tensor) -> None:
        self.editor.set_background_keys(features.to(self.editor.device))

    def _check_compatible(self, config: MEMOIRHyperParams) -> None:
        """Same memory (module, k, key rule) as the attached one; tau, n_iter, lr, wd may change."""
        current = self.editor.config
        wanted = config.to_memoir_config(current)
        for name in ("target_module", "top_k", "key_aggregation"):
            if getattr(current, name) != getattr(wanted, name):
                raise ValueError(f"the model already carries a MEMOIR memory with {name}={getattr(current, name)!r}; "
                                 f"these hyper-parameters ask for {getattr(wanted, name)!r} (call reset_layer() first)")
        if wanted != current:
            self.editor.config = wanted

    @property
    def memoir_editor(self) -> MemoirEditor:
        """The underlying :class:`memoir.MemoirEditor`."""
        return self.editor

    def get_adapter_layer(self):
        """The :class:`memoir.MemoirLayer` that replaced the edited module."""
        if not self.editor.attached:
            raise RuntimeError("MEMOIR: the original layer was restored (reset_layer); apply MEMOIR again")
        return self.editor.layer

    def reset_layer(self) -> None:
        """Put the original module back (bit for bit) and drop the memory. Idempotent."""
        self.editor.detach()

    # ------------------------------------------------------------------------------ editing
    def edit(self, config: MEMOIRHyperParams, tokens: dict | None = None, requests: list[dict] | None = None,
             **kwargs) -> list:
        """Apply the edit(s) of ``requests`` (or of reference-format ``tokens``, row 0) in order.

        ``act_mask`` / ``deact_mask`` are accepted and ignored (MEMOIR does not use them).
        Returns the :class:`memoir.EditResult` of each edit.
        """
        unknown = set(kwargs) - {"act_mask", "deact_mask"}
        if unknown:
            raise TypeError(f"MEMOIR.edit got unexpected arguments {sorted(unknown)}")
        self.get_adapter_layer()
        self._check_compatible(config)
        if requests is not None:
            pairs = [_request_pair(r, i) for i, r in enumerate(requests)]
            pairs = [(_templated(self.tokenizer, p, config), t) for p, t in pairs]
        elif tokens is not None:
            pairs = _pairs_from_tokens(self.tokenizer, tokens)
        else:
            raise ValueError("MEMOIR.edit needs tokens or requests")
        return [self.editor.edit(prompt, target) for prompt, target in pairs]

    def save_background(self, requests: list[dict]) -> Path:
        """``RUN_SAVE_BACKGROUND_FEATURES`` mode: add the keys of the requests' ``loc_prompt`` to the
        collected features and (re)write ``dir_to_save_background_features``; no edit is made."""
        texts = [r.get("loc_prompt") for r in requests]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("RUN_SAVE_BACKGROUND_FEATURES needs a non-empty 'loc_prompt' in every request")
        self._saved_features.append(self.editor.collect_keys(texts, 16).cpu())
        path = Path(self.config.dir_to_save_background_features)
        save_background_features(torch.cat(self._saved_features), path)
        return path

    # ------------------------------------------------------------------------------ inference
    def __call__(self, *args, last_prompt_token_loc_inference=None, **kwargs):
        """Run the model; ``last_prompt_token_loc_inference`` gives each row's last prompt position."""
        self.get_adapter_layer()
        if last_prompt_token_loc_inference is not None and not cached_length(args, kwargs):
            shaped = kwargs.get("input_ids", args[0] if args else None)
            if shaped is None:
                shaped = kwargs.get("inputs_embeds")
            if shaped is None:
                raise ValueError("last_prompt_token_loc_inference needs input_ids or inputs_embeds")
            kwargs["prompt_lengths"] = _prompt_lengths(last_prompt_token_loc_inference, kwargs.get("attention_mask"),
                                                       shaped.shape[0], shaped.shape[1], shaped.device)
        return self.editor(*args, **kwargs)

    def generate(self, *args, last_prompt_token_loc_inference=None, **kwargs):
        """``model.generate`` with routing: each row is routed on its prompt at prefill."""
        self.get_adapter_layer()
        if args:
            kwargs["input_ids"] = args[0]
        return self.editor.generate(**kwargs)

    def save(self, path) -> None:
        """Save the memory (``memoir.load(model, tok, path)`` restores it)."""
        self.editor.save(path)

    def __getattr__(self, name: str):
        # Anything else (config of the model, device, generation_config, ...) is the model's.
        if name in ("model", "editor", "config", "tokenizer"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"MEMOIR({self.editor!r})"


def _prompt_lengths(last, attention_mask, batch: int, seq_len: int, device) -> torch.Tensor:
    """Per row, the number of real tokens up to and including position ``last[b]``."""
    last = torch.as_tensor(last, device=device).reshape(-1)
    if last.is_floating_point() or last.dtype == torch.bool:
        raise TypeError("last_prompt_token_loc_inference must hold integer positions")
    last = last.long()
    if last.numel() == 1 and batch > 1:
        last = last.expand(batch)
    if last.numel() != batch:
        raise ValueError(f"last_prompt_token_loc_inference has {last.numel()} entries for a batch of {batch}")
    if (last < 0).any() or (last >= seq_len).any():
        raise ValueError(f"last_prompt_token_loc_inference must be in [0, {seq_len - 1}], got {last.tolist()}")
    positions = torch.arange(seq_len, device=device)
    upto = positions[None, :] <= last[:, None]
    if attention_mask is None:
        return upto.sum(dim=1)
    lengths = (attention_mask.to(device).bool() & upto).sum(dim=1)
    if (lengths < 1).any():
        raise ValueError("last_prompt_token_loc_inference points before the first real token of a row")
    return lengths


def apply_memoir_to_model(model, tok, requests: list[dict], hparams: MEMOIRHyperParams, copy: bool = False,
                          **kwargs: Any) -> tuple[MEMOIR, _Restore]:
    """Edit ``model`` with ``requests`` (EasyEdit dicts) and return ``(editor, weights_copy)``.

    The memory is kept on the model, so calling this once per request (EasyEdit's
    ``sequential_edit=True``) accumulates the edits. ``weights_copy()`` restores the original layer.
    Extra EasyEdit arguments (``return_orig_weights``, ``keep_original_weight``, ``train_ds``) are
    accepted and ignored.

    Requests: ``prompt``, ``target_new``; ``loc_prompt``, ``rephrase_prompt`` and ``locality`` are
    optional (``loc_prompt`` is only read in ``RUN_SAVE_BACKGROUND_FEATURES`` mode).
    """
    if not isinstance(hparams, MEMOIRHyperParams):
        raise TypeError(f"hparams must be MEMOIRHyperParams, got {type(hparams).__name__}")
    if isinstance(model, MEMOIR):
        model = model.model
    requests = list(requests) if not isinstance(requests, dict) else [requests]
    for index, request in enumerate(requests):
        _request_pair(request, index)
    if copy:
        model = copy_module.deepcopy(model)
    if (hparams.dir_background_features is None and hparams.prompt_feature_agg == "mean_decentered"
            and not hparams.RUN_SAVE_BACKGROUND_FEATURES
            and not isinstance(getattr(model, "_memoir_editor", None), MemoirEditor)):
        warnings.warn("MEMOIR: dir_background_features is not set; the background mean comes from memoir's "
                      "bundled generic sentences (see memoir.easyedit.compute_background_features)", stacklevel=2)
    editor = MEMOIR(hparams, model, tokenizer=tok)
    if hparams.RUN_SAVE_BACKGROUND_FEATURES:
        editor.save_background(requests)
    else:
        for request in requests:
            LOG.info("MEMOIR edit: [%s] -> [%s]", request["prompt"], request["target_new"])
        tokens = tokenize(requests, tok, hparams)
        editor.edit(config=hparams, tokens=tokens, requests=requests)
    return editor, _Restore(editor)


# ----------------------------------------------------------------------------------- EasyEdit registry
def register() -> None:
    """Add ``MEMOIR`` to EasyEdit's algorithm table (``easyeditor.util.alg_dict.ALG_DICT``) and
    expose :class:`MEMOIRHyperParams` as ``easyeditor.MEMOIRHyperParams``.

    Raises ``ImportError`` when EasyEdit is not installed.
    """
    try:
        import easyeditor
        from easyeditor.util import alg_dict
    except ImportError as error:
        raise ImportError(f"memoir.easyedit.register() needs EasyEdit (package 'easyeditor'): {error}") from None
    alg_dict.ALG_DICT["MEMOIR"] = apply_memoir_to_model
    easyeditor.MEMOIRHyperParams = MEMOIRHyperParams
    easyeditor.apply_memoir_to_model = apply_memoir_to_model
