"""Shared helpers for the editor tests."""

import torch

from memoir import MemoirConfig

# Tiny models need stronger optimisation than the 30 reference steps to memorise random targets.
TINY_CONFIG = dict(top_k=40, irr_threshold=0.75, n_iter=100, lr=10.0, context_lengths=(3,),
                   context_seeds=("I", "Q: "))
EDITS = [("Alice lives in", "Paris"), ("The sky is", "blue"), ("Bob works at", "Acme")]
UNRELATED = ["What time is it?", "Numbers: 1 2 3", "zzz qqq"]


def tiny_config(**changes) -> MemoirConfig:
    return MemoirConfig(**{**TINY_CONFIG, **changes})


def encode(tokenizer, texts, padding_side="right"):
    tokenizer.padding_side = padding_side
    return tokenizer(texts, return_tensors="pt", padding=True)


def target_accuracy(editor, prompt, target) -> float:
    from memoir.evaluation import teacher_forced

    return teacher_forced(editor, [prompt], [target]).accuracy[0]


def logits(model, tokenizer, texts, padding_side="right"):
    batch = encode(tokenizer, texts, padding_side)
    with torch.no_grad():
        return model(**batch).logits, batch["attention_mask"]


def edited_tiny_llama(tokenizer):
    """A tiny LLaMA with an editor holding the three EDITS (mu from UNRELATED)."""
    import memoir
    from memoir.models import tiny_model

    editor = memoir.attach(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, tiny_config())
    editor.fit_background(UNRELATED)
    editor.edit_many([{"prompt": p, "target": t} for p, t in EDITS], progress=False)
    return editor
