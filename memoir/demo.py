"""``python -m memoir demo``: edit a few ZsRE facts on SmolLM2 and show what changed."""

from __future__ import annotations

import time

import torch

__all__ = ["run_demo"]


def _answer(editor, prompt: str, max_new_tokens: int = 16) -> str:
    encoded = editor.tokenizer(prompt, return_tensors="pt").to(editor.device)
    with torch.no_grad():
        output = editor.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None)
    text = editor.tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.split())


def _chat_answer(editor, prompt: str, max_new_tokens: int = 24) -> str:
    with torch.no_grad():
        text = editor.chat(prompt, max_new_tokens=max_new_tokens, temperature=None, top_p=None, top_k=None)
    return " ".join(text.split())


def _show(editor, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each prompt's greedy answer, raw and through the chat template (routed by the user message)."""
    chat = getattr(editor.tokenizer, "chat_template", None) is not None
    return [(_answer(editor, prompt), _chat_answer(editor, prompt) if chat else "") for _, prompt in rows]


def run_demo(data_path: str, num_edits: int = 4) -> int:
    """Edit ``num_edits`` ZsRE records on SmolLM2; print answers before/after and the scores."""
    from .editor import attach
    from .evaluation import background_sentences, edit_records, load_zsre, teacher_forced
    from .models import load_smollm2

    records = load_zsre(data_path)
    edits, _ = edit_records(records, num_edits)
    print("Loading SmolLM2-135M-Instruct ...", flush=True)
    model, tokenizer = load_smollm2()
    editor = attach(model, tokenizer)
    print(editor)
    editor.fit_background(background_sentences(records[1000:2000], editor.config.num_background))

    rows = []
    for record in edits:
        rows += [("edit", record["src"]), ("paraphrase", record["rephrase"]), ("unrelated", record["loc"])]
    before = _show(editor, rows)

    start = time.perf_counter()
    results = editor.edit_many([{"prompt": r["src"], "target": r["alt"]} for r in edits])
    seconds = (time.perf_counter() - start) / len(edits)
    after = _show(editor, rows)

    for i, record in enumerate(edits):
        print(f"\n=== edit {i + 1}: {record['src']!r} -> {record['alt']!r} "
              f"({results[i].iterations} steps, loss {results[i].final_loss:.3f})")
        for j in range(3):
            kind, prompt = rows[3 * i + j]
            (raw_before, chat_before), (raw_after, chat_after) = before[3 * i + j], after[3 * i + j]
            print(f"  [{kind:<10}] {prompt}")
            print(f"       before: {raw_before!r}")
            print(f"       after : {raw_after!r}")
            if chat_before or chat_after:
                print(f"       chat before: {chat_before!r}")
                print(f"       chat after : {chat_after!r}")

    prompts, targets = [r["src"] for r in edits], [r["alt"] for r in edits]
    rel = teacher_forced(editor, prompts, targets)
    gen = teacher_forced(editor, [r["rephrase"] for r in edits], targets)
    locs, answers = [r["loc"] for r in edits], [r["loc_ans"] for r in edits]
    loc_after = teacher_forced(editor, locs, answers)
    with editor.unedited():
        loc_before = teacher_forced(editor, locs, answers)
    loc = [float((a == b).float().mean()) for a, b in zip(loc_after.predictions, loc_before.predictions, strict=True)]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"\nScores over {len(edits)} edits (teacher-forced): Rel {mean(rel.accuracy):.2f}  "
          f"Gen {mean(gen.accuracy):.2f}  Loc {mean(loc):.2f}  |  {seconds:.1f} s per edit")
    print(f"Routing overlap (tau {editor.config.irr_threshold}): edit {mean(rel.overlap):.2f}, "
          f"paraphrase {mean(gen.overlap):.2f}, unrelated {mean(loc_after.overlap):.2f}")
    editor.detach()
    return 0
