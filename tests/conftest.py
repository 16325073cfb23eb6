"""Shared fixtures. TRITON_INTERPRET is set before any kernel module is imported, so Triton
kernels (when present) run on CPU tensors on machines without a GPU."""

import os

import pytest

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch is not None and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def backend_from_the_environment():
    """Every test starts from MEMOIR_BACKEND as the environment says, whatever an earlier test chose
    with ``memoir_kernels.set_backend``."""
    from memoir_kernels import set_backend

    set_backend(None)
    yield
    set_backend(None)


@pytest.fixture()
def triton_backend():
    """Select the Triton backend for the test (reset after it), or skip with the reason Triton cannot
    run here (the GPU when there is one, else the CPU under TRITON_INTERPRET)."""
    from memoir_kernels import set_backend
    from memoir_kernels._triton import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if reason:
        pytest.skip(reason)
    set_backend("triton")  # backend_from_the_environment resets it after the test


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    torch.manual_seed(1234)
    return 1234


@pytest.fixture(scope="session")
def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII), for the tiny random models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct model and tokenizer (converted once, cached)."""
    from memoir.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def zsre_records():
    """The ZsRE dev records shipped in shared/."""
    from memoir.cli import _default_data
    from memoir.evaluation import load_zsre

    return load_zsre(_default_data())
