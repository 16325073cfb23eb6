"""TopHash splits a long prompt's token sum over several programs per sequence.

Up to MIN_TOKENS_PER_PROGRAM tokens one program per sequence sums and selects (as before); above,
chunks of tokens times blocks of columns each write a partial sum, and one program per sequence
adds the partials in chunk order and selects.

On comparing with the reference: the split changes only the order of the fp32 additions. With
quarter-step activations every partial and total sum is exact in fp32 whatever the order, so
there the masks must equal the reference's bit for bit (as in test_tophash.py, whose exact tests
are unchanged). On random floats the key may differ from the reference's in its last bits, which
can swap two entries whose |key| differ by less than that rounding: there the selection is checked
against the float64 key with a tolerance bounded by the fp32 summation error (T terms).
"""

import importlib

import pytest
import torch

from memoir_kernels import prompt_keys, tophash, tophash_reference, unpack_bits

from .helpers import kernel_device as _device


def _module():
    return importlib.import_module("memoir_kernels.tophash")  # (the package's `tophash` is the function)


@pytest.fixture()
def launches(monkeypatch):
    """The (kernel name, grid) of every TopHash launch made during the test."""
    module = _module()
    seen = []
    real = module.wrap_triton

    def spy(kernel):
        wrapped = real(kernel)
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        class Launcher:
            def __getitem__(self, grid):
                seen.append((name, tuple(grid)))
                return wrapped[grid]

        return Launcher()

    monkeypatch.setattr(module, "wrap_triton", spy)
    return seen


@pytest.fixture()
def small_chunks(monkeypatch):
    """Chunks of 2 tokens and column blocks of 64: every test shape splits, with partial chunks
    and partial blocks."""
    module = _module()
    monkeypatch.setattr(module, "MIN_TOKENS_PER_PROGRAM", 2)
    monkeypatch.setattr(module, "PARTIAL_BLOCK_D", 64)


def _exact_inputs(batch, tokens, dim, dtype):
    """Quarter-step activations (exact sums in any order) and a window with a hole in each row."""
    device = _device()
    acts = (torch.randint(-8, 8, (batch, tokens, dim)) / 4).to(dtype).to(device)
    window = torch.rand(batch, tokens) < 0.7
    window[:, 0] = True
    mu = (torch.randint(-4, 4, (dim,)) / 8).to(device)
    return acts, window.to(device), mu, torch.randperm(dim).to(device)


SHAPES = [
    pytest.param(1, 7, 130, 40, id="1x7x130"),  # 4 chunks (last of 1 token), 3 column blocks (last of 2)
    pytest.param(3, 6, 100, 29, id="3x6x100"),
    pytest.param(2, 9, 64, 64, id="k=D"),
    pytest.param(1, 5, 1536, 439, id="smollm2"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,tokens,dim,k", SHAPES)
def test_split_sum_equals_reference_exactly(triton_backend, small_chunks, launches, dtype, batch, tokens, dim, k):
    acts, window, mu, perm = _exact_inputs(batch, tokens, dim, dtype)
    got = tophash(acts, window, mu, perm, k)
    assert torch.equal(got, tophash_reference(acts, window, mu, perm, k))
    chunks = -(-tokens // 2)
    assert launches == [("_tophash_partial_kernel", (batch, chunks, -(-dim // 64))), ("_tophash_kernel", (batch,))]


def test_split_without_window_without_mu_and_an_empty_window(triton_backend, small_chunks):
    acts, window, _, perm = _exact_inputs(3, 8, 200, torch.float32)
    window[1] = False  # an empty window: zero key, so the tie rule alone picks the mask
    assert torch.equal(tophash(acts, window, None, perm, 50), tophash_reference(acts, window, None, perm, 50))
    assert torch.equal(tophash(acts, None, None, perm, 50), tophash_reference(acts, None, None, perm, 50))
    full = torch.ones(3, 8, dtype=torch.bool, device=acts.device)
    assert torch.equal(tophash(acts, None, None, perm, 50), tophash(acts, full, None, perm, 50))


def test_short_prompts_stay_one_program_per_sequence(triton_backend, launches):
    """Up to MIN_TOKENS_PER_PROGRAM tokens nothing is split: one launch, as before."""
    module = _module()
    acts, window, mu, perm = _exact_inputs(2, module.MIN_TOKENS_PER_PROGRAM, 70, torch.float32)
    assert torch.equal(tophash(acts, window, mu, perm, 20), tophash_reference(acts, window, mu, perm, 20))
    assert launches == [("_tophash_kernel", (2,))]


def test_long_prefill_at_batch_one_runs_on_many_programs(triton_backend, launches):
    """A 4096-token prompt at batch 1, default constants: 64 chunks of 64 tokens (times the column
    blocks) sum it, where one program did before; the mask is the reference's exactly."""
    module = _module()
    tokens, dim = 4096, 96
    acts, window, mu, perm = _exact_inputs(1, tokens, dim, torch.float16)
    got = tophash(acts, window, mu, perm, 30)
    assert torch.equal(got, tophash_reference(acts, window, mu, perm, 30))
    assert module.tokens_per_program(tokens) == 64
    assert launches == [("_tophash_partial_kernel", (1, 64, 1)), ("_tophash_kernel", (1,))]


def test_split_on_random_floats_selects_the_float64_top_k_up_to_rounding(triton_backend, small_chunks):
    """Random fp32 activations: the split kernel's mask is deterministic (two runs equal) and is a
    top-k of the float64 key up to the fp32 summation error: every selected |key| is at least every
    unselected one minus that bound."""
    batch, tokens, dim, k = 3, 11, 300, 77
    device = _device()
    acts = torch.randn(batch, tokens, dim, device=device)
    window = torch.rand(batch, tokens, device=device) < 0.8
    window[:, 0] = True
    mu, perm = torch.randn(dim, device=device), torch.randperm(dim, device=device)
    got = tophash(acts, window, mu, perm, k)
    assert torch.equal(got, tophash(acts, window, mu, perm, k))
    key = prompt_keys(acts.double(), window, mu.double()).abs().cpu()
    # fp32 sum of n terms: |error| <= n * 2^-24 * sum |terms|, over the window's count; then the
    # division and the mu subtraction add a few ulps of the key. Doubled for margin.
    weights = window.double().cpu()
    magnitude = torch.einsum("bt,btd->bd", weights, acts.double().abs().cpu()) / weights.sum(1, keepdim=True)
    bound = 2 * ((tokens + 4) * 2.0**-24 * magnitude + 4 * 2.0**-24 * (key + mu.double().abs().cpu()))
    chosen = unpack_bits(got, dim).cpu()[:, perm.cpu()]  # mask position perm[i] holds key index i
    assert (chosen.sum(dim=1) == k).all()
    for row in range(batch):
        inside, outside = key[row][chosen[row]], key[row][~chosen[row]]
        slack = bound[row].max()
        assert inside.min() >= outside.max() - slack, (row, inside.min().item(), outside.max().item())
    reference = unpack_bits(tophash_reference(acts, window, mu, perm, k), dim)
    assert ((unpack_bits(got, dim) & reference).sum(dim=1) >= k - 2).all()
