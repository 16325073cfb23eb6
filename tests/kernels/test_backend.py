import pytest
import torch

import memoir_kernels
from memoir_kernels import available_backends, requested_backend, resolve_backend, set_backend, use_backend


def test_public_api_is_pinned():
    assert sorted(memoir_kernels.__all__) == sorted([
        "available_backends", "inverse_permutation", "mask_search", "mask_search_reference", "mask_search_topk",
        "mask_search_topk_reference", "masked_residual", "memoir_down_proj",
        "memoir_down_proj_reference", "memoir_down_proj_routed", "memoir_down_proj_routed_reference", "num_words",
        "pack_bits", "prompt_keys", "requested_backend",
        "resolve_backend", "set_backend", "use_backend", "tophash", "tophash_from_keys", "tophash_reference", "tophash_residual", "tophash_residual_reference", "unpack_bits",
    ])


def test_auto_prefers_native_search_on_cpu(monkeypatch):
    monkeypatch.setenv("MEMOIR_BACKEND", "auto")
    assert available_backends("mask_search", "cpu")[0] == "native"
    assert resolve_backend("mask_search", "cpu") == "native"


def test_the_environment_is_read_once_and_set_backend_changes_the_choice(monkeypatch):
    monkeypatch.setenv("MEMOIR_BACKEND", "torch")
    assert resolve_backend("mask_search", "cpu") == "torch"
    monkeypatch.setenv("MEMOIR_BACKEND", "native")
    assert resolve_backend("mask_search", "cpu") == "torch"  # not read again per call
    with use_backend("native"):
        assert resolve_backend("mask_search", "cpu") == "native"
    assert resolve_backend("mask_search", "cpu") == "torch"
    set_backend(None)  # read the environment again on next use
    assert resolve_backend("mask_search", "cpu") == "native"
    with pytest.raises(ValueError, match="is not one of"):
        set_backend("fortran")


def test_cuda_is_the_old_name_of_native(monkeypatch):
    monkeypatch.setenv("MEMOIR_BACKEND", "CUDA")
    assert requested_backend() == "native"
    assert resolve_backend("mask_search", "cpu") == "native"


def test_torch_backend_forces_reference(monkeypatch):
    monkeypatch.setenv("MEMOIR_BACKEND", "torch")
    assert resolve_backend("mask_search", "cpu") == "torch"


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("MEMOIR_BACKEND", "fortran")
    with pytest.raises(ValueError, match="MEMOIR_BACKEND"):
        resolve_backend("mask_search", "cpu")


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    from memoir_kernels import _native

    monkeypatch.setenv("MEMOIR_BACKEND", "native")
    # the same answer whether this machine's extension was built with CUDA or not
    monkeypatch.setattr(_native, "native_has_cuda", lambda: False)
    with pytest.raises(RuntimeError, match="native cannot run mask_search on cuda: .*without CUDA"):
        resolve_backend("mask_search", "cuda")
    with pytest.raises(RuntimeError, match="cannot run mask_search on meta: no compiled kernel for device type 'meta'"):
        resolve_backend("mask_search", "meta")


def test_op_without_such_implementation_uses_its_best(monkeypatch):
    monkeypatch.setenv("MEMOIR_BACKEND", "native")
    assert resolve_backend("tophash", "cpu") == "torch"


def test_import_does_not_pull_transformers():
    import subprocess
    import sys

    code = "import sys, memoir_kernels; assert 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_results_equal_across_backends(monkeypatch):
    from memoir_kernels import mask_search, pack_bits

    bank = pack_bits(torch.rand(500, 300) < 0.3)
    query = pack_bits(torch.rand(4, 300) < 0.3)
    results = {}
    for name in ("torch", "native"):
        with use_backend(name):
            results[name] = mask_search(query, bank)
    assert all(torch.equal(a, b) for a, b in zip(results["torch"], results["native"], strict=True))


def test_auto_never_picks_the_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("MEMOIR_BACKEND", "auto")
    assert resolve_backend("tophash", "cpu") == "torch"
    assert resolve_backend("memoir_down_proj", "cpu") == "torch"


def _registered_op_samples():
    from memoir_kernels import pack_bits

    generator = torch.Generator().manual_seed(5)
    bank = pack_bits(torch.rand(6, 70, generator=generator) < 0.3)
    query = pack_bits(torch.rand(3, 70, generator=generator) < 0.3)
    a, memory = torch.randn(6, 70, generator=generator), torch.randn(70, 9, generator=generator)
    base = torch.randn(6, 9, generator=generator)
    index, overlap = torch.tensor([4, 0, 2]), torch.tensor([12, 3, 9], dtype=torch.int32)
    gate = torch.tensor([True, False, True])
    key, perm = torch.randn(70, generator=generator), torch.randperm(70, generator=generator)
    acts, window = torch.randn(2, 5, 70, generator=generator), torch.rand(2, 5, generator=generator) < 0.7
    return {
        "tophash": (acts, window, torch.randn(70, generator=generator), perm, 20, None),
        "mask_search": (query, bank),
        "mask_search_topk": (query, bank, 4),
        "memoir_down_proj": (a, None, memory, None, 2, bank[:3], gate, None, base),
        "memoir_down_proj_routed": (a, memory, None, 2, bank, index, overlap, 8, base),
        "memoir_down_proj_routed_": (a, memory, None, 2, bank, index, overlap, 8, base.clone()),
        "tophash_residual": (key, perm, 20, a.clone().requires_grad_(), memory.clone().requires_grad_(), None),
    }


@pytest.mark.parametrize("name", list(_registered_op_samples()))
def test_each_public_op_is_one_registered_op(name):
    """Schema, fake (meta) implementation and autograd registration of every public op, checked by
    torch.library.opcheck on the kernel this machine runs."""
    torch.library.opcheck(getattr(torch.ops.memoir, name).default, _registered_op_samples()[name])
