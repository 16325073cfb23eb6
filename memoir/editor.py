"""MemoirEditor: attach MEMOIR to a Hugging Face causal LM, edit it, route, save, detach."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .architectures import Architecture, architecture_of, get_submodule, resolve_config
from .background import GENERIC_SENTENCES
from .checkpoint import resume_stream, terminate_as_interrupt, write_checkpoint
from .concurrency import ReadWriteGate
from .config import MemoirConfig
from .layer import MemoirLayer, RouteDecision, StopForward
from .registry import EditRecord, EditRegistry, read_edits_file, utc_now
from .rehearsal import build_training_batch, choose_rehearsal
from .routing import RoutingState, cached_length
from .tokens import pad_id_of
from .training import (
    BlockStack,
    EditResult,
    answer_end_id,
    build_edit_batch,
    cached_context_prefixes,
    optimise_edit,
)

__all__ = ["MemoirEditor", "attach", "load", "validate_request", "summarise", "MIN_BACKGROUND"]

# Fewer irrelevant sentences than this among edit_many's requests: use the bundled background.
MIN_BACKGROUND = 20


def attach(model: nn.Module, tokenizer, config: MemoirConfig | None = None) -> MemoirEditor:
    """Wrap ``model``'s target projection with a MEMOIR memory and return the editor.

    Args:
        model: a Hugging Face causal LM (LLaMA, Mistral, Qwen2, GPT-J, GPT-NeoX, GPT-2, ...).
        tokenizer: its tokenizer.
        config: settings; ``None`` fields come from the model's preset.

    Example:
        >>> editor = memoir.attach(model, tokenizer)
        >>> editor.edit("The capital of France is", "Lyon")
        >>> editor.detach()  # the original module is back, bit for bit
    """
    return MemoirEditor(model, tokenizer, config)


def load(model: nn.Module, tokenizer, path) -> MemoirEditor:
    """Attach the memory saved at ``path`` to ``model`` and return its editor.

    The file is verified first (checksum, structure, the model's fingerprint: see
    :mod:`memoir.persistence`); on any failure (``FileNotFoundError``, ``ValueError``) the model is
    left exactly as it was.

    Example:
        >>> editor = memoir.load(model, tokenizer, "my_memory/")
    """
    from .persistence import attach_memory, read_memory

    config, metadata, tensors = read_memory(path)
    editor = MemoirEditor(model, tokenizer, config)
    try:
        attach_memory(editor, metadata, tensors)
    except BaseException:
        editor.detach()
        raise
    return editor


def validate_request(request, index: int | None = None) -> tuple[str, str]:
    """``(prompt, target)`` of an edit request dict; raises a clear error for a bad one."""
    where = "" if index is None else f" (request {index})"
    if not isinstance(request, dict):
        raise TypeError(f"an edit request is a dict with 'prompt' and 'target'{where}, got {type(request).__name__}")
    target_key = "target" if "target" in request else "target_new"
    if "prompt" not in request or target_key not in request:
        raise ValueError(f"an edit request needs 'prompt' and 'target' (or EasyEdit's 'target_new'){where}; "
                         f"got keys {sorted(request)}")
    return _check_text(request["prompt"], "prompt" + where), _check_text(request[target_key], "target" + where)


def _check_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


class MemoirEditor:
    """A MEMOIR memory attached to one model. Create it with :func:`attach` or :func:`memoir.load`."""

    def __init__(self, model: nn.Module, tokenizer, config: MemoirConfig | None = None) -> None:
        if tokenizer is None or not callable(tokenizer):
            raise TypeError("attach needs the model's tokenizer")
        config = resolve_config(model, config)
        if isinstance(getattr(model, "_memoir_editor", None), MemoirEditor):
            raise RuntimeError("this model already has a MEMOIR editor attached; detach it first")
        target = get_submodule(model, config.target_module)
        if isinstance(target, MemoirLayer):
            raise RuntimeError(f"{config.target_module} is already a MemoirLayer")
        self.model, self.tokenizer = model, tokenizer
        self.layer = MemoirLayer(target, config.top_k, config.irr_threshold, config.key_aggregation, config.seed,
                                 config.memory_dtype)
        self._settings = config.replace(irr_threshold=None)  # tau lives in the layer alone (see config)
        self.context_prefixes: list[str] | None = None
        self.num_edits = 0
        self.history: list[EditResult] = []
        self.registry = EditRegistry()
        self._warned_unrecorded = False
        self._derive_from_settings()
        self._routing = RoutingState()
        self._gate = ReadWriteGate()  # forward calls read the memory; edits change it (memoir.concurrency)
        self._open_reads = threading.local()
        self._stack = self._find_block_stack(architecture_of(model)) if config.fast_edit else None
        self._replace(target, self.layer)
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]
        model._memoir_editor = self

    # ------------------------------------------------------------------------- attach / detach
    def _replace(self, old: nn.Module, new: nn.Module) -> None:
        parent_name, _, child = self.config.target_module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        if getattr(parent, child) is not old:
            raise RuntimeError(f"{self.config.target_module} changed while attaching")
        setattr(parent, child, new)

    @property
    def attached(self) -> bool:
        """True until :meth:`detach`."""
        return bool(self._hooks)

    def detach(self) -> nn.Module:
        """Put the original module back and remove every hook; returns the model."""
        if not self.attached:
            return self.model
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._replace(self.layer, self.layer.base_layer)
        del self.model._memoir_editor
        return self.model

    def _require_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("this editor was detached; attach a new one")

    def _find_block_stack(self, arch: Architecture) -> BlockStack | None:
        prefix = arch.blocks + "."
        name = self.config.target_module
        index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        try:
            blocks = self.model.get_submodule(arch.blocks)
            norm = self.model.get_submodule(arch.final_norm) if arch.final_norm else None
        except AttributeError:
            blocks = norm = None
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not index.isdigit() or norm is None or head is None or not isinstance(blocks, nn.ModuleList):
            warnings.warn(f"MEMOIR: no fast editing path for {type(self.model).__name__}; using the plain recipe",
                          stacklevel=3)
            return None
        if name != f"{prefix}{index}.{arch.mlp_out}":
            # The fast path adds the residual straight into the block's output after its MLP.
            raise ValueError(f"target_module {name!r} is not the MLP output projection of a decoder block "
                             f"(here {prefix}N.{arch.mlp_out}); the fast editing path needs one. "
                             "Pass MemoirConfig(fast_edit=False) to edit another linear layer with the plain recipe")
        # The MLP holding the edited projection, relative to its block ("mlp" for "mlp.down_proj").
        mlp_path = name[len(prefix) + len(index) + 1:].rpartition(".")[0] or None
        return BlockStack(blocks, int(index), norm, head, mlp_path)

    # ------------------------------------------------------------------------------- hooks
    def _before_forward(self, _module, args, kwargs):
        prompt_lengths = kwargs.pop("prompt_lengths", None)
        # Entered first: a change of the memory by another thread finishes before this call reads it.
        self._gate.enter_read()
        self._open_reads.count = getattr(self._open_reads, "count", 0) + 1
        try:
            self._plan_call(args, kwargs, prompt_lengths)
        except BaseException:
            self._leave_read()
            raise
        return args, kwargs

    def _plan_call(self, args, kwargs, prompt_lengths) -> None:
        if not self.layer.routing:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shaped = input_ids if input_ids is not None else embeds
        if shaped is None:
            self.layer.call = None
            return
        attention_mask = kwargs.get("attention_mask")
        self.layer.call = self._routing.plan(
            input_ids, attention_mask, cached_length(args, kwargs, attention_mask, shaped.shape[1]), prompt_lengths,
            batch=shaped.shape[0], seq_len=shaped.shape[1], device=shaped.device,
        )

    def _after_forward(self, _module, _args, _output):
        # Registered with always_call: runs after a forward that raised, too, so the read is left.
        try:
            if self.layer.routing:
                self._routing.finish()
                self.layer.call = None
        finally:
            self._leave_read()

    def _leave_read(self) -> None:
        if getattr(self._open_reads, "count", 0) > 0:
            self._open_reads.count -= 1
            self._gate.exit_read()

    # ------------------------------------------------------------------------------- settings
    @property
    def config(self) -> MemoirConfig:
        """This memory's settings; ``irr_threshold`` is the layer's tau, the one place it is kept."""
        return self._settings.replace(irr_threshold=self.layer.irr_threshold)

    @config.setter
    def config(self, config: MemoirConfig) -> None:
        """Change the settings that may change on a stored memory (tau, steps, lr, decay, rehearsal...);
        the memory's shape (``target_module``, ``top_k``, ``key_aggregation``, ``seed``) must stay."""
        for name in ("target_module", "top_k", "key_aggregation", "seed", "memory_dtype"):
            if getattr(config, name) != getattr(self._settings, name):
                raise ValueError(f"{name} cannot change on an attached memory ({getattr(self._settings, name)!r} "
                                 f"-> {getattr(config, name)!r}): detach and attach a new editor")
        self.set_threshold(config.irr_threshold)
        self._settings = config.replace(irr_threshold=None)
        self._derive_from_settings()

    def _derive_from_settings(self) -> None:
        settings = self._settings
        self._end_id = answer_end_id(self.model, self.tokenizer, settings)  # taught after each target, or None
        # The chat-templated turn is trained too when asked for and the tokenizer has a template.
        self._chat_rows = bool(settings.train_chat) and getattr(self.tokenizer, "chat_template", None) is not None

    def set_threshold(self, tau: float) -> None:
        """Route a prompt to the memory when its overlap ratio with the nearest stored mask is >= ``tau``."""
        MemoirConfig(irr_threshold=tau)  # the same checks as the config's
        with self._gate.write():
            self.layer.irr_threshold = float(tau)
            self._routing.reset()

    # ------------------------------------------------------------------------------- editing
    @property
    def device(self) -> torch.device:
        return self.layer.memory.device

    @contextlib.contextmanager
    def unedited(self):
        """Within the block the model is the original one (the memory is off), e.g. to compare
        ``editor.generate`` before and after; other threads' forward calls wait until it ends."""
        self._require_attached()
        with self._gate.write(), self.layer.disabled():
            yield

    @contextlib.contextmanager
    def _frozen_model(self):
        """Eval mode and no gradients for the base weights while W_m trains; both restored."""
        params = [p for p in self.model.parameters() if p is not self.layer.memory]
        flags = [p.requires_grad for p in params]
        was_training = self.model.training
        self.model.eval()
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            self.model.train(was_training)

    def ensure_context_prefixes(self) -> list[str]:
        """The context prefixes, generated once per model by the unedited model (greedy, so
        reproducible), cached on disk (``MEMOIR_CACHE``) and saved with the memory."""
        if self.context_prefixes is None:
            from .persistence import layer_fingerprint

            with self.unedited(), self._frozen_model():
                self.context_prefixes = cached_context_prefixes(self.model, self.tokenizer, self.config,
                                                                layer_fingerprint(self.layer.base_layer))
        return self.context_prefixes

    @torch.no_grad()
    def fit_background(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Set the background mean mu from irrelevant sentences; returns mu ``[D]``.

        mu is the mean of the sentences' keys (mean activation over all their tokens). It must be
        fixed before the first edit: stored masks depend on it.
        """
        self._require_attached()
        texts = [_check_text(t, "background text") for t in texts]
        if not texts:
            raise ValueError("fit_background needs at least one text")
        with self._gate.write():
            self._require_no_masks()
            return self.set_background_keys(self._collect_keys(texts, batch_size))

    def set_background_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Set mu to the mean of precomputed background keys ``[N, D]`` (e.g. a features file);
        like :meth:`fit_background`, only before the first edit. Returns mu ``[D]``."""
        self._require_attached()
        if keys.dim() != 2 or keys.shape[1] != self.layer.in_features or not keys.shape[0]:
            raise ValueError(f"background keys must be [N >= 1, {self.layer.in_features}], got {tuple(keys.shape)}")
        with self._gate.write():
            self._require_no_masks()
            self.layer.background_mean = keys.mean(dim=0).to(self.layer.background_mean)
            self.layer.has_background = True
            return self.layer.background_mean

    def _require_no_masks(self) -> None:
        if self.layer.num_masks:
            raise RuntimeError("the background mean must be set before the first edit (stored masks depend on it)")

    @torch.no_grad()
    def collect_keys(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Keys ``[N, D]`` (fp32) of ``texts``: each one's mean activation at the edited layer over all
        its tokens, without mu. Their mean is the background mean; EasyEdit saves them as features.
        """
        self._require_attached()
        texts = [_check_text(t, "text") for t in texts]
        if not texts:
            raise ValueError("collect_keys needs at least one text")
        return self._collect_keys(texts, batch_size)

    def _collect_keys(self, texts: list[str], batch_size: int) -> torch.Tensor:
        from .routing import prompt_window
        from .tokens import batch_prompt_target

        with self._gate.write(), self.layer.collecting() as keys, self._frozen_model():
            try:
                for start in range(0, len(texts), batch_size):
                    chunk = texts[start : start + batch_size]
                    batch = batch_prompt_target(self.tokenizer, chunk, [""] * len(chunk)).to(self.device)
                    self.layer.call = _window_context(prompt_window(batch.attention_mask, None))
                    with contextlib.suppress(StopForward):
                        self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            finally:
                self.layer.call = None
        return torch.cat(keys)

    def edit(self, prompt: str, target: str) -> EditResult:
        """Write one fact: after it, ``prompt`` (and its paraphrases) continue with ``target``.

        Raises ``TypeError``/``ValueError`` for a bad prompt or target before anything changes; if
        the edit fails midway (an error, a non-finite value: :class:`NonFiniteEditError`), the
        memory is restored to its state before the call. Safe to call while other threads run the
        model: it waits for their forward calls in progress, and theirs wait for it.
        """
        with self._gate.write():
            return self._edit(prompt, target)

    def _edit(self, prompt: str, target: str) -> EditResult:
        self._require_attached()
        prompt, target = _check_text(prompt, "prompt"), _check_text(target, "target")
        prefixes = self.ensure_context_prefixes()
        if not self.layer.has_background and self.config.key_aggregation == "mean_decentered":
            # No background given: the bundled generic questions and statements (memoir.background),
            # which keep unrelated prompts under tau where the context prefixes did not.
            self.fit_background(GENERIC_SENTENCES[: self.config.num_background])
        self._check_length(prompt, target, prefixes)
        start = time.perf_counter()
        saved = self.layer.memory.detach().clone()
        replaced = self.registry.find(prompt)
        try:
            rehearsed = self._choose_rehearsal(prompt)
            batch, rehearsal = build_training_batch(self.tokenizer, prompt, target, prefixes, rehearsed,
                                                    self.layer.bank_bits, self.config, self._end_id,
                                                    self._chat_rows)
            if rehearsal is not None:
                rehearsal.bits = rehearsal.bits.to(self.device)
            with self._frozen_model():
                losses, bits = optimise_edit(self.model, self.layer, self.config, batch.to(self.device),
                                             self._stack, rehearsal)
            row, added = self.layer.add_mask(bits)
        except BaseException:
            with torch.no_grad():
                self.layer.memory.copy_(saved)
            raise
        self.num_edits += 1
        result = EditResult(prompt, target, losses, row, added, time.perf_counter() - start, len(rehearsed),
                            utc_now())
        self.history.append(result)
        self._record(result, replaced)
        return result

    def _check_length(self, prompt: str, target: str, prefixes: list[str]) -> None:
        """Refuse, before anything runs, an edit whose longest training row exceeds the model's positions."""
        limit = _position_limit(self.model)
        if limit is None:
            return
        longest = int(build_edit_batch(self.tokenizer, prompt, target, prefixes, self._end_id,
                                       self._chat_rows).lengths.max())
        if longest > limit:
            raise ValueError(f"this edit's longest training row (context prefix + prompt + target) is {longest} "
                             f"tokens, more than the model's {limit} positions: shorten the prompt or the target")

    def _choose_rehearsal(self, prompt: str) -> list[EditRecord]:
        """The stored edits to rehearse in this edit's batch (none with ``rehearse`` 0)."""
        if not self.config.rehearse or not self.layer.num_masks:
            return []
        if self.registry.unrecorded:
            if not self._warned_unrecorded:
                self._warned_unrecorded = True
                warnings.warn(f"MEMOIR: this memory holds {self.registry.unrecorded} edits saved without their "
                              "prompts (a file from before the edit registry): editing without rehearsal",
                              stacklevel=3)
            return []
        if not any(record.active for record in self.registry):
            return []
        return choose_rehearsal(self.registry, self.layer.bank_bits, self._prompt_mask(prompt), self.config,
                                self.layer.top_k, prompt)

    def _prompt_mask(self, prompt: str) -> torch.Tensor:
        """TopHash mask ``[1, W]`` of ``prompt`` alone, as routing computes it."""
        key = self._collect_keys([prompt], 1).to(self.device)
        mu = self.layer._mu()
        return self.layer.mask_from_key(key - mu if mu is not None else key)

    def _record(self, result: EditResult, replaced: list[EditRecord]) -> None:
        """Add ``result`` to the registry; earlier active edits of the same prompt become replaced."""
        index = self.registry.next_index()
        self.registry.append(EditRecord(index, result.prompt, result.target, result.time, result.iterations,
                                        result.final_loss, result.seconds, result.mask_row, result.new_mask,
                                        rehearsed=result.rehearsed))
        for record in replaced:
            self.registry.mark_replaced(record.index, index)
        self.sync_routing()

    def sync_routing(self) -> None:
        """Make routing follow the registry (withdrawn rows stop gating) and drop cached decisions."""
        self.layer.row_active = self.registry.row_active(self.layer.num_masks, self.layer.bank_bits.device)
        self._routing.reset()

    # ------------------------------------------------------------------------------- registry
    @property
    def edits(self) -> tuple[EditRecord, ...]:
        """Every edit of this memory in order (read-only records: ``.prompt``, ``.target``, ``.status``,
        ``.time``, ``.final_loss``, ...); ``editor.edits[i]`` is edit ``i``."""
        return self.registry.records

    def find(self, prompt: str) -> list[EditRecord]:
        """The active edit record(s) whose prompt is exactly ``prompt``."""
        return self.registry.find(prompt)

    def withdraw(self, index: int) -> EditRecord:
        """Take edit ``index`` (as in ``editor.edits[index]``) back: its mask stops routing.

        Its prompt then gives the original model's output bit for bit, and every other prompt
        gives exactly what it gave before (the row stays in the bank; its columns are untouched).
        A mask row shared by several edits (identical masks) keeps routing while any of them is
        active. Saved with the memory. Returns the updated record.
        """
        self._require_attached()
        with self._gate.write():
            record = self.registry.withdraw(index)
            self.sync_routing()
        return record

    def export_edits(self, path) -> int:
        """Write the active edits (prompt, target, time) as JSON Lines to ``path``; returns how many.

        ``edit_many(path)`` replays the file onto another model, e.g. a new version of the base
        model that the old memory's fingerprint no longer matches.
        """
        from .persistence import atomic_write_text

        lines = self.registry.export_lines()
        atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
        return len(lines)

    def edit_many(self, requests: Iterable[dict] | str | os.PathLike, progress: bool = True,
                  background: Sequence[str] | None = None, checkpoint_dir=None,
                  checkpoint_every: int = 100, on_edit: Callable[[int], None] | None = None) -> list[EditResult]:
        """Apply edits one after another (sequential editing), with a progress bar.

        Args:
            requests: dicts with ``prompt`` and ``target`` (``target_new`` accepted), or the path of
                a JSON Lines file of them (what :meth:`export_edits` writes); an optional
                ``loc_prompt`` / ``irrelevant`` sentence per request feeds the background mean
                when none was fitted yet.
            progress: show a tqdm bar (edits per second, last loss, stored masks) and a summary.
            background: irrelevant sentences for the background mean (overrides the requests').
            checkpoint_dir: save the memory and the stream's progress here every
                ``checkpoint_every`` edits, at the end, and when the run is interrupted (Ctrl-C,
                SIGTERM - raised as :class:`~memoir.checkpoint.StreamTerminated` - or an error).
                Calling again with the same requests resumes from it: the memory is restored and
                the requests already done are skipped, so nothing is lost or repeated.
            checkpoint_every: edits between checkpoints.
            on_edit: called with the number of requests done after each edit (e.g. to score the
                memory at points of the run).

        Returns:
            One :class:`EditResult` per request, those restored from a checkpoint included.

        All requests are validated before the first edit, so a bad one changes nothing.
        """
        self._require_attached()
        requests = read_edits_file(requests) if isinstance(requests, (str, os.PathLike)) else list(requests)
        pairs = [validate_request(r, i) for i, r in enumerate(requests)]
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        with self._gate.write():
            done, results = resume_stream(self, checkpoint_dir, pairs) if checkpoint_dir is not None else (0, [])
        if not self.layer.has_background and self.config.key_aggregation == "mean_decentered":
            texts = list(background) if background is not None else _irrelevant_sentences(requests)
            # A handful of the requests' unrelated prompts is a poor mean: below MIN_BACKGROUND of
            # them, the first edit fits the bundled background instead.
            if texts and (background is not None or len(texts) >= MIN_BACKGROUND):
                self.fit_background(texts[: self.config.num_background])
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), initial=done, desc="MEMOIR edits", unit="edit", disable=not progress)
        saved_at = done
        stop_on_sigterm = terminate_as_interrupt() if checkpoint_dir is not None else contextlib.nullcontext()
        with stop_on_sigterm:
            try:
                for prompt, target in pairs[done:]:
                    results.append(self.edit(prompt, target))
                    done += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{results[-1].final_loss:.3f}", masks=self.layer.num_masks)
                    if checkpoint_dir is not None and done - saved_at >= checkpoint_every:
                        write_checkpoint(self, checkpoint_dir, pairs, done, results)
                        saved_at = done
                    if on_edit is not None:
                        on_edit(done)
            finally:
                bar.close()
                # Also on Ctrl-C, SIGTERM or an error: every completed edit is kept (an edit in
                # progress was rolled back by edit() and is redone on resume).
                if checkpoint_dir is not None and done > saved_at:
                    write_checkpoint(self, checkpoint_dir, pairs, done, results)
        if progress:
            print(summarise(results), file=sys.stderr)
        return results

    # ------------------------------------------------------------------------------- inference
    def __call__(self, *args, **kwargs):
        """Run the model (routing included); accepts ``prompt_lengths`` like the model does."""
        self._require_attached()
        return self.model(*args, **kwargs)

    def generate(self, **kwargs):
        """``model.generate`` with routing decided at prefill and kept for every decode step."""
        self._require_attached()
        kwargs.setdefault("pad_token_id", pad_id_of(self.tokenizer))
        return self.model.generate(**kwargs)

    @property
    def last_decision(self) -> RouteDecision | None:
        """The routing decision of this thread's last forward call that routed new prompts (index,
        overlap and gate per row); ``None`` before one, and after an edit or a withdrawal."""
        return self._routing.decision

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> dict:
        """Routing of each prompt: ``index`` (nearest mask), ``overlap`` (ratio to k), ``gate``."""
        from .tokens import batch_prompt_target

        self._require_attached()
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"route takes a list of prompts, got {type(prompts).__name__} "
                            "(wrap a single prompt in a list)")
        prompts = [_check_text(p, "prompt") for p in prompts]
        if not prompts:
            return {"index": [], "overlap": [], "gate": []}
        batch = batch_prompt_target(self.tokenizer, prompts, [""] * len(prompts)).to(self.device)
        self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        decision = self.last_decision if self.layer.num_masks else None
        if decision is None:
            n = len(prompts)
            return {"index": [-1] * n, "overlap": [0.0] * n, "gate": [False] * n}
        return {
            "index": decision.index.tolist(),
            "overlap": (decision.overlap.clamp_min(0).double() / self.layer.top_k).tolist(),
            "gate": decision.gate.tolist(),
        }

    @contextlib.contextmanager
    def routed_as(self, prompts: Sequence[str]):
        """Within the block, this thread's forward calls route row b as ``prompts[b]`` alone would.

        For inputs whose routing key would be off: a chat-templated prompt routes by its user
        message (the template's tokens would enter the key), e.g.
        ``with editor.routed_as([question]): model.generate(**templated_batch)``.
        """
        from .tokens import batch_prompt_target

        self._require_attached()
        prompts = [_check_text(p, "prompt") for p in prompts]
        if not self.layer.num_masks:
            yield
            return
        batch = batch_prompt_target(self.tokenizer, prompts, [""] * len(prompts)).to(self.device)
        with torch.no_grad():
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        with self._routing.fixed(self.last_decision):
            yield

    def chat(self, messages: list[dict] | str, **generate_kwargs) -> str:
        """Answer a chat (a user message, or a list of ``{"role", "content"}`` messages) through the
        tokenizer's chat template; routing follows the last user message alone. Returns the text.

        Example:
            >>> editor.chat("What university did Watts Humphrey attend?", max_new_tokens=20)
        """
        self._require_attached()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError("chat needs at least one user message: {'role': 'user', 'content': '...'}")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; use editor.generate with a plain prompt")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = self.tokenizer([text], return_tensors="pt", add_special_tokens=False).to(self.device)
        generate_kwargs.setdefault("max_new_tokens", 64)
        generate_kwargs.setdefault("do_sample", False)
        with self.routed_as([users[-1]]):
            out = self.generate(**batch, **generate_kwargs)
        return self.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    # ------------------------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write ``memoir_config.json`` and ``memoir_memory.safetensors`` to directory ``path``."""
        from .persistence import save_editor

        self._require_attached()
        save_editor(self, path)

    def __repr__(self) -> str:
        return (f"MemoirEditor({self.config.target_module}, edits={self.num_edits}, masks={self.layer.num_masks}, "
                f"rehearse={self.config.rehearse}, "
                f"top_k={self.config.top_k}, tau={self.config.irr_threshold}, attached={self.attached})")


def _position_limit(model: nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings``, ``n_positions``), if it says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _window_context(window):
    from .layer import CallContext

    return CallContext(window=window)


def _irrelevant_sentences(requests: list[dict]) -> list[str]:
    texts = []
    for request in requests:
        text = request.get("irrelevant") or request.get("loc_prompt")
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return texts


def summarise(results: list[EditResult]) -> str:
    """One line about a stream of edits: count, new masks, steps, final loss, seconds per edit."""
    if not results:
        return "MEMOIR: no edits"
    count = len(results)
    new_masks = sum(r.new_mask for r in results)
    steps = sum(r.iterations for r in results) / count
    loss = sum(r.final_loss for r in results) / count
    seconds = sorted(r.seconds for r in results)[count // 2]
    return (f"MEMOIR: {count} edits, {new_masks} new masks, {steps:.1f} steps and final loss {loss:.4f} on average, "
            f"median {seconds:.2f} s per edit")
