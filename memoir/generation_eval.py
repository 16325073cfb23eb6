"""What a user sees: greedy ``generate`` after the edits, scored (``python -m memoir eval --generate``).

Teacher-forced scores say whether each target token is the argmax given the right prefix; they do
not say whether a generated answer is the target and then stops. Here every edited prompt,
paraphrase and unrelated prompt is continued greedily (``max_new_tokens`` = its target's tokens
+ 10) through the editor's normal routing, and:

* ``gen_exact_rel`` / ``gen_exact_gen``: share of edited prompts / paraphrases whose continuation
  begins with the target's tokens;
* ``gen_clean``: share of those exact continuations (both sets) that, within 10 tokens after the
  target, end (an EOS or end-of-turn token, a newline, or a sentence end) and do not start the
  target again;
* ``gen_loc``: share of unrelated prompts whose continuation equals the unedited model's exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .tokens import batch_prompt_target, chat_prompt, pad_id_of

__all__ = ["classify_continuation", "generation_scores", "end_token_ids", "Continuation", "AFTER_TARGET"]

AFTER_TARGET = 10  # tokens generated past the target, and the window in which the answer must end
_SENTENCE_ENDS = (".", "!", "?")


@dataclass
class Continuation:
    """How one greedy continuation relates to its target."""

    exact: bool  # begins with the target's tokens
    clean: bool  # exact, then ends within AFTER_TARGET tokens without starting the target again


def end_token_ids(model, tokenizer) -> set[int]:
    """Tokens that end an answer: the generation config's EOS id(s) and the tokenizer's EOS."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int):
                ids.add(item)
    return ids


def classify_continuation(tokens: list[int], target: list[int], end_ids: set[int], decode) -> Continuation:
    """Is ``tokens`` (generated ids) the ``target`` ids, and does the answer end cleanly after it?

    ``decode`` turns ids into text (newlines and sentence ends are read from the text).
    """
    if not target or tokens[: len(target)] != target:
        return Continuation(False, False)
    rest = tokens[len(target) : len(target) + AFTER_TARGET]
    if rest[:1] == target[:1]:  # the target starts again at once: "Lamiinae Lamiinae ..."
        return Continuation(True, False)
    for count, token in enumerate(rest, start=1):
        if token in end_ids:
            return Continuation(True, True)
        text = decode(rest[:count])
        if "\n" in text or text.rstrip().endswith(_SENTENCE_ENDS):
            return Continuation(True, True)
    return Continuation(True, False)


def _target_ids(tokenizer, prompts: list[str], answers: list[str], separator: str = " ") -> list[list[int]]:
    batch = batch_prompt_target(tokenizer, prompts, answers, separator=separator)
    return [batch.input_ids[i, int(batch.prompt_lengths[i]) : int(batch.lengths[i])].tolist()
            for i in range(len(prompts))]


@torch.no_grad()
def _greedy(editor, prompts: list[str], budgets: list[int], route_prompts: list[str] | None = None,
            batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (left-padded batches), each cut to its own token budget; with
    ``route_prompts`` row i is routed as ``route_prompts[i]`` alone."""
    tokenizer = editor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk, limits = prompts[start : start + batch_size], budgets[start : start + batch_size]
            batch = tokenizer(chunk, return_tensors="pt", padding=True).to(editor.device)
            routing = (editor.routed_as(route_prompts[start : start + batch_size]) if route_prompts is not None
                       else contextlib.nullcontext())
            with routing:
                generated = editor.model.generate(**batch, max_new_tokens=max(limits), do_sample=False, num_beams=1,
                                                  temperature=None, top_p=None, top_k=None,
                                                  pad_token_id=pad_id_of(tokenizer))
            new = generated[:, batch["input_ids"].shape[1]:].tolist()
            out += [row[:limit] for row, limit in zip(new, limits, strict=True)]
    finally:
        tokenizer.padding_side = side
    return out


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else float("nan")


def generation_scores(editor, records: list[dict], chat: bool = False, examples: int = 5) -> dict:
    """The ``gen_*`` scores of ``records`` (ZsRE ``src``/``rephrase``/``alt``/``loc``/``loc_ans``)
    under the editor's current memory. With ``chat`` every prompt goes through the chat template
    as a user message and is routed by that message (:meth:`MemoirEditor.routed_as`)."""

    tokenizer, model = editor.tokenizer, editor.model
    end_ids = end_token_ids(model, tokenizer)
    raw = {key: [r[key] for r in records] for key in ("src", "rephrase", "loc")}
    shown = {key: [chat_prompt(tokenizer, p) for p in texts] if chat else texts for key, texts in raw.items()}
    routes = raw if chat else {key: None for key in raw}
    srcs, rephrases, locs = shown["src"], shown["rephrase"], shown["loc"]
    targets = [r["alt"] for r in records]
    gap = "" if chat else " "  # an assistant turn starts right after the template's header
    rel_ids, gen_ids = _target_ids(tokenizer, srcs, targets, gap), _target_ids(tokenizer, rephrases, targets, gap)
    loc_budgets = [len(ids) + AFTER_TARGET
                   for ids in _target_ids(tokenizer, locs, [r["loc_ans"] for r in records], gap)]
    with editor.unedited():
        unedited_loc = _greedy(editor, locs, loc_budgets)
    rel_out = _greedy(editor, srcs, [len(ids) + AFTER_TARGET for ids in rel_ids], routes["src"])
    gen_out = _greedy(editor, rephrases, [len(ids) + AFTER_TARGET for ids in gen_ids], routes["rephrase"])
    loc_out = _greedy(editor, locs, loc_budgets, routes["loc"])

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    rel = [classify_continuation(o, t, end_ids, decode) for o, t in zip(rel_out, rel_ids, strict=True)]
    gen = [classify_continuation(o, t, end_ids, decode) for o, t in zip(gen_out, gen_ids, strict=True)]
    exact = [c for c in rel + gen if c.exact]
    with editor.unedited():
        before = _greedy(editor, srcs[:examples], [len(ids) + AFTER_TARGET for ids in rel_ids[:examples]])
    return {
        "gen_exact_rel": _share(c.exact for c in rel),
        "gen_exact_gen": _share(c.exact for c in gen),
        "gen_clean": _share(c.clean for c in exact),
        "gen_loc": _share(a == b for a, b in zip(loc_out, unedited_loc, strict=True)),
        "generate_examples": [
            {"prompt": p, "target": t, "before": tokenizer.decode(b, skip_special_tokens=True),
             "after": tokenizer.decode(a, skip_special_tokens=True)}
            for p, t, b, a in zip(raw["src"][:examples], targets[:examples], before, rel_out[:examples], strict=False)],
        "per_record_generate": {"rel_exact": [c.exact for c in rel], "rel_clean": [c.clean for c in rel],
                                "gen_exact": [c.exact for c in gen], "gen_clean": [c.clean for c in gen]},
    }
