"""One MEMOIR edit: the 11-row batch, the optimisation of W_m, and the fast path.

The fast path runs everything below the edited block once per edit (captured at its input), then
per iteration only the edited block and those above it, and the LM head on target positions only.
It computes the same loss as the plain recipe (full forward, full logits) up to float rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MemoirConfig
from .head_loss import linear_cross_entropy, loss_dtype, row_mean_weights
from .layer import MemoirLayer, TrainingPass
from .tokens import TokenBatch, batch_prompt_target, chat_prompt, pad_id_of

__all__ = ["EditResult", "generate_context_prefixes", "cached_context_prefixes", "prefix_cache_path", "edit_prompts", "edit_rows", "build_edit_batch", "answer_end_id", "optimise_edit", "BlockStack",
           "Rehearsal", "NonFiniteEditError"]


@dataclass
class EditResult:
    """What one edit did."""

    prompt: str
    target: str
    losses: list[float] = field(default_factory=list)  # loss before each step taken
    mask_row: int = -1  # bank row of the edit's mask
    new_mask: bool = True  # False when an identical mask was already stored
    seconds: float = 0.0
    rehearsed: int = 0  # stored edits rehearsed in this edit's batch
    time: str = ""  # UTC time the edit finished (ISO 8601)

    @property
    def iterations(self) -> int:
        return len(self.losses)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@dataclass
class BlockStack:
    """The decoder blocks from the edited one up, the final norm and the head (fast path)."""

    blocks: nn.ModuleList
    start: int
    final_norm: nn.Module
    head: nn.Module
    mlp_path: str | None = None  # the MLP inside each block ("mlp"); None runs blocks unchanged


@torch.no_grad()
def generate_context_prefixes(model: nn.Module, tokenizer, config: MemoirConfig) -> list[str]:
    """Greedy continuations of the seed words by the unedited model (caller turns the memory off).

    One sequence per (length, seed), generated alone so no padding can skew it. Greedy decoding
    under a fixed seed: the same model always gives the same prefixes.
    """
    device = next(model.parameters()).device
    prefixes = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        for length in config.context_lengths:
            for seed in config.context_seeds:
                encoded = tokenizer(seed, return_tensors="pt").to(device)
                output = model.generate(
                    **encoded, max_new_tokens=length, do_sample=False, num_beams=1, temperature=None, top_p=None,
                    top_k=None, pad_token_id=pad_id_of(tokenizer),
                )
                prefixes.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return prefixes


def prefix_cache_path(model: nn.Module, tokenizer, config: MemoirConfig, layer_fingerprint: str) -> Path:
    """Cache file of the context prefixes of this model, tokenizer and seed words.

    Keyed by the model class and config, the edited layer's weights (a fine-tune changes them),
    the vocabulary size and the prefix settings.
    """
    from .models import cache_root

    model_config = getattr(model, "config", None)
    described = model_config.to_json_string(use_diff=False) if hasattr(model_config, "to_json_string") else ""
    key = json.dumps([type(model).__name__, described, layer_fingerprint, len(tokenizer),
                      list(config.context_lengths), list(config.context_seeds), config.seed])
    return cache_root() / "context_prefixes" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def cached_context_prefixes(model: nn.Module, tokenizer, config: MemoirConfig, layer_fingerprint: str) -> list[str]:
    """:func:`generate_context_prefixes`, generated once per model and then read from disk."""
    path = prefix_cache_path(model, tokenizer, config, layer_fingerprint)
    try:
        prefixes = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(prefixes, list) and all(isinstance(p, str) for p in prefixes):
            return prefixes
    except (OSError, ValueError):
        pass  # not cached yet, or an unreadable file: generate again
    prefixes = generate_context_prefixes(model, tokenizer, config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(prefixes), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a regeneration next time
    return prefixes


def edit_prompts(prompt: str, prefixes: list[str]) -> list[str]:
    """The prompts of an edit's rows: ``prompt`` itself, then ``prefix + ' ' + prompt`` per prefix."""
    return [prompt] + [f"{prefix} {prompt}" for prefix in prefixes]


def edit_rows(tokenizer, prompt: str, prefixes: list[str], chat: bool = False) -> tuple[list[str], list[str]]:
    """Prompts and separators of an edit's own rows: :func:`edit_prompts`, then with ``chat`` the
    prompt as a user message through the chat template (the answer starts the assistant's turn,
    so no space before it)."""
    prompts = edit_prompts(prompt, prefixes)
    separators = [" "] * len(prompts)
    if chat:
        prompts.append(chat_prompt(tokenizer, prompt))
        separators.append("")
    return prompts, separators


def build_edit_batch(tokenizer, prompt: str, target: str, prefixes: list[str], end_id: int | None = None,
                     chat: bool = False) -> TokenBatch:
    """Row 0: ``prompt + ' ' + target``; then one row per context prefix, ``prefix + ' ' + row 0``;
    with ``chat`` a last row, the chat-templated turn (:func:`edit_rows`); with ``end_id`` each
    target is followed by that token (see :func:`answer_end_id`)."""
    prompts, separators = edit_rows(tokenizer, prompt, prefixes, chat)
    return batch_prompt_target(tokenizer, prompts, [target] * len(prompts), end_id, separators)


def answer_end_id(model: nn.Module, tokenizer, config: MemoirConfig) -> int | None:
    """The token taught after each target (``answer_end="eos"``), or ``None`` (the faithful recipe).

    The token ``generate`` stops at: the model's generation config's ``eos_token_id`` (its first
    one), which for chat models is the end-of-turn token (SmolLM2-Instruct: ``<|im_end|>``),
    else the tokenizer's EOS.
    """
    if config.answer_end == "none":
        return None
    generation = getattr(model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    raise ValueError("answer_end='eos' needs an EOS token (generation_config.eos_token_id or the tokenizer's); "
                     "set answer_end='none' for a model without one")


def _mean_row_loss(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, num_rows: int,
                   row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of each row's mean target cross-entropy (``logits [n, V]`` for ``n`` targets),
    weighted by ``row_weights [num_rows]`` when given."""
    token_loss = F.cross_entropy(logits.to(loss_dtype(logits.dtype)), labels, reduction="none")
    per_row = token_loss.new_zeros(num_rows).index_add(0, rows, token_loss)
    counts = token_loss.new_zeros(num_rows).index_add(0, rows, torch.ones_like(token_loss))
    row_loss = per_row / counts.clamp_min(1.0)
    if row_weights is None:
        return row_loss.mean()
    share = row_weights.to(row_loss)
    return (row_loss * share).sum() / share.sum()


class _Captured(Exception):
    """Stops the capture forward at the edited block."""


class _PlainLoss:
    """Reference recipe: the whole model forward, logits on every position."""

    def __init__(self, model: nn.Module, batch: TokenBatch, row_weights: torch.Tensor | None = None) -> None:
        self.model, self.batch, self.row_weights = model, batch, row_weights
        self.rows, self.positions = batch.target_positions()
        self.labels = batch.input_ids[self.rows, self.positions]

    def __call__(self) -> torch.Tensor:
        output = self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False)
        logits = output.logits[self.rows, self.positions - 1]
        return _mean_row_loss(logits, self.labels, self.rows, self.batch.input_ids.shape[0], self.row_weights)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class _FastLoss(_PlainLoss):
    """Fast path: nothing up to the edited layer is recomputed, head on target positions only.

    One capture pass (memory off) records the edited layer's input ``a`` and the edited block's
    output. The MLP output is added straight into the residual stream in every supported family, so
    with the memory the block's output is that capture plus ``(m * a) @ W_m``; each iteration
    starts from there and runs only the blocks above.
    """

    def __init__(self, model: nn.Module, batch: TokenBatch, stack: BlockStack, layer: MemoirLayer,
                 session: TrainingPass, row_weights: torch.Tensor | None = None) -> None:
        super().__init__(model, batch, row_weights)
        self.stack, self.layer = stack, layer
        self.session = session
        self.args, self.kwargs, self.block_output, self.acts = self._capture()
        self.needed_tokens, self.loss_tokens = self._token_selection()
        self.token_weights = row_mean_weights(self.rows, batch.input_ids.shape[0], loss_dtype(self.acts.dtype),
                                              row_weights)
        self.logits_buffer: torch.Tensor | None = None

    @torch.no_grad()
    def _capture(self) -> tuple[tuple, dict, torch.Tensor, torch.Tensor]:
        """The edited block's inputs (args, kwargs), its output and the edited layer's input."""
        captured = {}

        def grab_input(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args, dict(kwargs)

        def grab_output(_module, _args, output):
            captured["output"] = _first(output)
            raise _Captured

        block = self.stack.blocks[self.stack.start]
        handles = [block.register_forward_pre_hook(grab_input, with_kwargs=True),
                   block.register_forward_hook(grab_output)]
        try:
            with self.layer.capturing() as capture, contextlib.suppress(_Captured):
                self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if "output" not in captured or capture.input is None:
            raise RuntimeError("the edited block was not reached by the forward pass")
        return captured["args"], captured["kwargs"], captured["output"], capture.input

    def _token_selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``row * L + position`` indices of the tokens whose MLP output can reach the loss.

        Causal attention never lets a later position or a padded key reach a loss position, so the
        blocks above need the MLP only up to each row's last loss position (the token before its
        last target token); the last block needs it only at the loss positions themselves.
        """
        width = self.batch.input_ids.shape[1]
        positions = torch.arange(width, device=self.batch.input_ids.device)
        needed = (positions[None, :] < self.batch.lengths[:, None] - 1).flatten().nonzero().squeeze(1)
        return needed, self.rows * width + self.positions - 1

    def __call__(self) -> torch.Tensor:
        kwargs = dict(self.kwargs)
        kwargs.pop("hidden_states", None)
        rest = self.args[1:]
        hidden = self.block_output + self.layer.training_residual(self.session, self.acts)
        above = self.stack.blocks[self.stack.start + 1 :]
        for number, block in enumerate(above):
            tokens = self.loss_tokens if number == len(above) - 1 else self.needed_tokens
            with _block_on_tokens(block, self.stack.mlp_path, tokens, self.needed_tokens):
                hidden = _first(block(hidden, *rest, **kwargs))
        selected = self.stack.final_norm(hidden[self.rows, self.positions - 1])
        if isinstance(self.stack.head, nn.Linear):
            if self.logits_buffer is None:
                self.logits_buffer = selected.new_empty((len(self.labels), self.stack.head.weight.shape[0]),
                                                        dtype=loss_dtype(selected.dtype))
            return linear_cross_entropy(selected, self.stack.head, self.labels, self.token_weights,
                                        self.logits_buffer)
        return _mean_row_loss(self.stack.head(selected), self.labels, self.rows, self.batch.input_ids.shape[0],
                              self.row_weights)


@contextlib.contextmanager
def _block_on_tokens(block: nn.Module, mlp_path: str | None, mlp_tokens: torch.Tensor, needed_tokens: torch.Tensor):
    """Run ``block``'s MLP on the flat token indices ``mlp_tokens`` only, and each linear layer of
    its attention on ``needed_tokens`` only; other positions get zeros.

    The MLP is position-wise and holds about two thirds of a block's matrix work, the attention's
    projections the rest. Padding and the tokens after each row's last loss position cannot reach
    the loss (causal attention), so their projections are skipped too: with rows of mixed lengths
    (a chat-templated row is twice as long as the others) that is most of what packing would save.
    """
    if mlp_path is None:
        yield
        return
    mlp = block.get_submodule(mlp_path)
    inside_mlp = {id(module) for module in mlp.modules()}
    attention = [module for module in block.modules() if isinstance(module, nn.Linear) and id(module) not in inside_mlp]
    handles = []
    try:
        handles += _on_tokens(mlp, mlp_tokens)
        for linear in attention:
            handles += _on_tokens(linear, needed_tokens)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _on_tokens(module: nn.Module, tokens: torch.Tensor) -> list:
    """Hooks that feed ``module`` only the rows ``tokens`` of its flattened input and scatter its
    output back into zeros. Inputs whose leading dimensions are not the block's tokens pass as is."""
    shape = {}

    def gather(_module, args):
        hidden = args[0]
        shape.pop("leading", None)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
            return None
        shape["leading"] = hidden.shape[:-1]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, tokens).unsqueeze(0), *args[1:])

    def scatter(_module, _args, output):
        if "leading" not in shape:
            return None
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"MEMOIR fast path: {type(_module).__name__} returned {type(output).__name__}, "
                               "expected a tensor; edit with fast_edit=False")
        leading = shape["leading"]
        full = output.new_zeros(leading.numel(), output.shape[-1]).index_copy(0, tokens, output[0])
        return full.view(*leading, -1)

    return [module.register_forward_pre_hook(gather), module.register_forward_hook(scatter)]


@dataclass
class Rehearsal:
    """Rows of stored edits appended to an edit's batch, each trained with its own stored mask."""

    bits: torch.Tensor  # [R, W] int64, the stored mask of each of the batch's last R rows
    row_weights: torch.Tensor  # [rows of the whole batch] loss weight of each row

    @property
    def rows(self) -> int:
        return self.bits.shape[0]


def optimise_edit(
    model: nn.Module, layer: MemoirLayer, config: MemoirConfig, batch: TokenBatch, stack: BlockStack | None,
    rehearsal: Rehearsal | None = None,
) -> tuple[list[float], torch.Tensor]:
    """Train W_m on ``batch`` with the edit's mask; returns the losses and the mask bits ``[1, W]``.

    SGD (lr, weight decay), gradient-norm clip, at most ``n_iter`` steps, early stop when the loss
    changed by at most ``early_stop_delta`` and is at most ``early_stop_loss``. With ``rehearsal``,
    the batch's last ``rehearsal.rows`` rows are stored edits, each trained with its stored mask,
    and the rows' losses are weighted by ``rehearsal.row_weights``.
    """
    row_weights = rehearsal.row_weights if rehearsal is not None else None
    memory = layer.memory
    decay = config.weight_decay if config.decay_scope == "all" else 0.0
    optimizer = torch.optim.SGD([memory], lr=config.lr, weight_decay=decay)
    losses: list[float] = []
    with layer.training_pass(batch.prompt_window(), rehearsal.bits if rehearsal is not None else None) as session:
        try:
            compute_loss = (_FastLoss(model, batch, stack, layer, session, row_weights) if stack is not None
                            else _PlainLoss(model, batch, row_weights))
            memory.requires_grad_(True)
            _train_steps(compute_loss, optimizer, layer, session, config, losses)
        finally:
            memory.requires_grad_(False)
            memory.grad = None
    return losses, session.bits


def _train_steps(compute_loss, optimizer, layer: MemoirLayer, session: TrainingPass, config: MemoirConfig,
                 losses: list[float]) -> None:
    """SGD steps until ``n_iter`` or the early stop, appending each loss to ``losses``."""
    memory = layer.memory
    for _ in range(config.n_iter):
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteEditError(_non_finite_cause("loss", losses, config, compute_loss))
        if losses and abs(value - losses[-1]) <= config.early_stop_delta and value <= config.early_stop_loss:
            losses.append(value)
            break
        losses.append(value)
        loss.backward()
        _finish_gradient(layer, session, config)
        if not bool(torch.isfinite(memory.grad).all()):
            raise NonFiniteEditError(_non_finite_cause("gradient", losses, config, compute_loss))
        optimizer.step()
    if not bool(torch.isfinite(memory).all()):
        raise NonFiniteEditError(_non_finite_cause("memory", losses, config, compute_loss))


class NonFiniteEditError(FloatingPointError):
    """An edit met a NaN or infinity (loss, gradient or memory); the edit was rolled back."""


def _non_finite_cause(what: str, losses: list[float], config: MemoirConfig, compute_loss) -> str:
    """The error message for a non-finite ``what``: where it most likely came from."""
    acts = getattr(compute_loss, "acts", None)
    if acts is not None and not bool(torch.isfinite(acts).all()):
        cause = "the activations entering the edited layer are not finite (check the model's weights and inputs)"
    elif not losses or (what == "gradient" and len(losses) == 1):
        cause = ("the model's output is not finite before any update: non-finite activations at or above the "
                 "edited layer (check the model's weights and inputs)")
    else:
        cause = (f"it diverged after {len(losses)} steps (last loss {losses[-1]:.4g}): the step size is too "
                 f"large (lr={config.lr}); lower lr or keep grad_clip > 0")
    return f"MEMOIR: non-finite {what} while editing; the edit was rolled back and nothing was stored: {cause}"


def _finish_gradient(layer: MemoirLayer, session: TrainingPass, config: MemoirConfig) -> None:
    memory = layer.memory
    if config.decay_scope == "masked" and config.weight_decay:
        from memoir_kernels import unpack_bits

        # The rows being trained: the edit's mask and, with rehearsal, the rehearsed edits' masks.
        trained = unpack_bits(session.bits, layer.in_features)[0]
        if session.rehearsal_bits is not None:
            trained = trained | unpack_bits(session.rehearsal_bits, layer.in_features).any(dim=0)
        rows = trained.to(memory.dtype).unsqueeze(1)
        memory.grad.add_(memory.detach() * rows, alpha=config.weight_decay)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_([memory], config.grad_clip)

