import pytest
import torch

from memoir_kernels import (
    memoir_down_proj,
    memoir_down_proj_reference,
    memoir_down_proj_routed,
    memoir_down_proj_routed_reference,
    pack_bits,
)

from .helpers import kernel_device as _device


def _inputs(tokens=7, dim=70, hidden=33, rows=3, dtype=torch.float32):
    a = torch.randn(tokens, dim, dtype=dtype)
    weight, memory = torch.randn(hidden, dim, dtype=dtype), torch.randn(dim, hidden)
    bias = torch.randn(hidden, dtype=dtype)
    masks = torch.rand(rows, dim) < 0.3
    row_of_token = torch.randint(0, rows, (tokens,))
    gate = torch.tensor([True, False, True][:rows])
    return a, weight, memory, row_of_token, masks, gate, bias


def _set_positions(words, dim):
    """Positions set in one packed mask, read bit by bit from its int64 words as _bits.py lays them
    out (position j is bit j % 64 of word j // 64), without the package's unpacking."""
    positions = []
    for w, word in enumerate(words):
        pattern = int(word) % (1 << 64)  # the word's two's-complement bits as a non-negative int
        positions += [64 * w + b for b in range(64) if (pattern >> b) & 1]
    assert all(j < dim for j in positions), "padding bits past D must be zero"
    return positions


def _naive_edited_output(a, memory, base, row_of_token, words_of_row, gated_rows):
    """Float64 oracle, one token at a time: out[t] = base[t] plus, when the token's row r is gated,
    the sum of a[t, j] * memory[j, :] over the positions j of row r's mask (``words_of_row[r]``, the
    packed words). Shares nothing with the package but the bit layout."""
    a64, memory64 = a.double().cpu(), memory.double().cpu()
    out = base.double().cpu().clone()
    if torch.is_tensor(row_of_token):
        rows = [int(r) for r in row_of_token]
    else:  # an int L: sequences of L tokens
        rows = [t // row_of_token for t in range(a.shape[0])]
    for t, r in enumerate(rows):
        if not gated_rows[r]:
            continue
        for j in _set_positions(words_of_row[r], a.shape[1]):
            out[t] += a64[t, j] * memory64[j]
    return out


def _assert_fp32_matches_oracle(got, oracle):
    """fp32 result against the float64 oracle: sums of a few dozen O(1) products, so fp32 rounding
    stays far below 1e-4; a wrong or missing column moves a value by O(1)."""
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), oracle, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", [memoir_down_proj, memoir_down_proj_reference], ids=["dispatch", "reference"])
def test_matches_naive_oracle(impl):
    """Against the float64 per-token oracle, base W0 a + bias computed in float64 too."""
    a, weight, memory, rows, masks, gate, bias = _inputs()
    bits = pack_bits(masks)
    y = impl(a, weight, memory, rows, bits, gate, bias)
    base64 = a.double() @ weight.double().T + bias.double()
    _assert_fp32_matches_oracle(y, _naive_edited_output(a, memory, base64, rows, bits.tolist(), gate.tolist()))


def test_ungated_tokens_equal_the_base_product_exactly():
    a, weight, memory, rows, masks, _, bias = _inputs()
    gate = torch.zeros(3, dtype=torch.bool)
    y = memoir_down_proj(a, weight, memory, rows, pack_bits(masks), gate, bias)
    assert torch.equal(y, torch.nn.functional.linear(a, weight, bias))


def test_single_token_and_empty_bank():
    a, weight, memory, _, _, _, _ = _inputs(tokens=1)
    y = memoir_down_proj(a, weight, memory, torch.zeros(1, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.int64),
                         torch.zeros(0, dtype=torch.bool))
    assert torch.equal(y, a @ weight.T)


def test_bad_shapes_raise():
    a, weight, memory, rows, masks, gate, bias = _inputs()
    with pytest.raises(ValueError, match="memory"):
        memoir_down_proj(a, weight, memory.T.contiguous(), rows, pack_bits(masks), gate, bias)


def test_reference_with_precomputed_base_keeps_ungated_rows_exact():
    """A given base is used as it is: ungated rows are it bit for bit, gated rows it plus the
    residual of the naive oracle (W0 and the bias are not read)."""
    a, weight, memory, rows, masks, gate, bias = _inputs()
    base = torch.nn.functional.linear(a, weight, bias) + 0.5  # any base: ungated rows must be it, bit for bit
    bits = pack_bits(masks)
    y = memoir_down_proj(a, None, memory, rows, bits, gate, base=base)
    ungated = ~gate[rows]
    assert torch.equal(y[ungated], base[ungated])
    _assert_fp32_matches_oracle(y, _naive_edited_output(a, memory, base, rows, bits.tolist(), gate.tolist()))


# ------------------------------------------------------------------------ Triton kernel (interpreter on CPU)


@pytest.mark.parametrize("with_base", [False, True], ids=["fused-base", "given-base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [pytest.param(t, id=f"T{t}") for t in (1, 5, 16, 17, 40)])
def test_triton_matches_reference_error_budget(triton_backend, tokens, dtype, with_base):
    """Both regimes (gather up to 16 tokens, dense above) against the fp32 reference: the kernel's
    error is at most about twice the reference's own error in the low-precision dtype."""
    a, weight, memory, rows, masks, gate, bias = (x.to(_device()) for x in _inputs(tokens=tokens))
    bits = pack_bits(masks)
    exact = memoir_down_proj_reference(a, weight, memory, rows, bits, gate, bias)
    a_l, w_l, b_l = a.to(dtype), weight.to(dtype), bias.to(dtype)
    base = torch.nn.functional.linear(a_l, w_l, b_l) if with_base else None
    got = memoir_down_proj(a_l, w_l, memory, rows, bits, gate, b_l, base=base)
    ref = memoir_down_proj_reference(a_l, w_l, memory, rows, bits, gate, b_l, base=base)
    assert got.dtype == dtype and got.shape == exact.shape
    ref_error = (ref.float() - exact).abs().max().item()
    got_error = (got.float() - exact).abs().max().item()
    assert got_error <= 2 * ref_error + 1e-4
    if with_base:
        ungated = ~gate[rows]
        assert torch.equal(got[ungated], base[ungated])


def test_triton_without_bias_single_row(triton_backend):
    a, weight, memory, _, masks, _, _ = (x.to(_device()) if torch.is_tensor(x) else x for x in _inputs(tokens=3, rows=1))
    rows = torch.zeros(3, dtype=torch.int64, device=a.device)
    gate = torch.ones(1, dtype=torch.bool, device=a.device)
    got = memoir_down_proj(a, weight, memory, rows, pack_bits(masks), gate)
    torch.testing.assert_close(got, memoir_down_proj_reference(a, weight, memory, rows, pack_bits(masks), gate),
                               rtol=1e-5, atol=1e-4)


def test_triton_op_passes_opcheck(triton_backend):
    a, weight, memory, rows, masks, gate, bias = (x.to(_device()) for x in _inputs(tokens=2))
    utils = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.memoir.down_proj_triton.default,
                          (a, weight, memory, rows, 0, pack_bits(masks), gate, bias, None), test_utils=utils)


@pytest.mark.parametrize("tokens_per_row", [1, 4, 9], ids=lambda n: f"L{n}")
def test_rows_given_as_sequence_length(triton_backend, tokens_per_row):
    """An int row_of_token L means R sequences of L tokens: token t belongs to row t // L."""
    a, weight, memory, _, masks, gate, bias = (x.to(_device()) for x in _inputs(tokens=3 * tokens_per_row))
    rows = torch.arange(3 * tokens_per_row, device=a.device) // tokens_per_row
    base = torch.nn.functional.linear(a, weight, bias)
    got = memoir_down_proj(a, None, memory, tokens_per_row, pack_bits(masks), gate, base=base)
    want = memoir_down_proj_reference(a, None, memory, rows, pack_bits(masks), gate, base=base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[~gate[rows]], base[~gate[rows]])


# ------------------------------------------------------------------ routed variant (mask search result in)


def _routed_inputs(tokens_per_row, rows=4, dim=70, hidden=33, bank=5, dtype=torch.float32, device="cpu"):
    """Activations of ``rows`` sequences, a bank of masks, the search result of each sequence (some
    pointing at the same stored mask, some not at their own row) and the base output."""
    a = torch.randn(rows * tokens_per_row, dim, device=device).to(dtype)
    weight, bias = torch.randn(hidden, dim, device=device).to(dtype), torch.randn(hidden, device=device).to(dtype)
    memory = torch.randn(dim, hidden, device=device)
    bank_bits = pack_bits(torch.rand(bank, dim, device=device) < 0.3)
    index = torch.tensor([3, 0, 3, 1, 4, 2][:rows], device=device)
    overlap = torch.tensor([12, 7, 9, 15, 3, 10][:rows], dtype=torch.int32, device=device)
    base = torch.nn.functional.linear(a, weight, bias)
    return a, weight, bias, memory, bank_bits, index, overlap, base


@pytest.mark.parametrize("impl", [memoir_down_proj_routed, memoir_down_proj_routed_reference],
                         ids=["dispatch", "reference"])
@pytest.mark.parametrize("min_overlap", [0, 9, 16])
def test_routed_is_down_proj_of_the_gathered_masks(impl, min_overlap):
    """Sequence r uses stored mask index[r], gated by overlap[r] >= min_overlap: against the float64
    oracle given those masks and gates by hand (min_overlap 0 gates every row, 16 none)."""
    a, _, _, memory, bank_bits, index, overlap, base = _routed_inputs(tokens_per_row=3)
    got = impl(a, memory, 3, bank_bits, index, overlap, min_overlap, base=base)
    bank = bank_bits.tolist()
    words_of_row = [bank[i] for i in index.tolist()]
    gated_rows = [o >= min_overlap for o in overlap.tolist()]
    _assert_fp32_matches_oracle(got, _naive_edited_output(a, memory, base, 3, words_of_row, gated_rows))
    ungated = ~torch.tensor(gated_rows).repeat_interleave(3)
    assert torch.equal(got[ungated], base[ungated])


def test_routed_empty_bank_is_the_base_output():
    """An empty bank gates nothing, decided by its shape: the search's index -1 is never read, and a
    threshold of 0 (tau <= 0) does not gate on the search's overlap 0."""
    a, _, _, memory, _, _, _, base = _routed_inputs(tokens_per_row=2)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    index, overlap = torch.full((4,), -1), torch.zeros(4, dtype=torch.int32)
    for impl in (memoir_down_proj_routed, memoir_down_proj_routed_reference):
        assert torch.equal(impl(a, memory, 2, empty, index, overlap, 0, base=base), base)


def test_routed_bad_inputs_raise():
    a, _, _, memory, bank_bits, index, overlap, base = _routed_inputs(tokens_per_row=2)
    with pytest.raises(ValueError, match="overlap"):
        memoir_down_proj_routed(a, memory, 2, bank_bits, index, overlap.long(), 5, base=base)
    with pytest.raises(ValueError, match="bank_bits"):
        memoir_down_proj_routed(a, memory, 2, bank_bits[:, :1], index, overlap, 5, base=base)
    with pytest.raises(ValueError, match="sequences"):
        memoir_down_proj_routed(a, memory, 3, bank_bits, index, overlap, 5, base=base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tokens_per_row", [pytest.param(n, id=f"T{4 * n}") for n in (1, 4, 5, 10)])
def test_triton_routed_matches_reference(triton_backend, tokens_per_row, dtype):
    """Both regimes (gather up to 16 tokens, dense above): gated rows within the fp32 error budget of
    the reference, ungated rows the base output bit for bit."""
    a, weight, bias, memory, bank_bits, index, overlap, _ = _routed_inputs(tokens_per_row, device=_device())
    min_overlap = 10  # rows 0 and 3 gated, rows 1 and 2 not
    exact = memoir_down_proj_routed_reference(a, memory, tokens_per_row, bank_bits, index, overlap, min_overlap,
                                              base=torch.nn.functional.linear(a, weight, bias))
    a_l = a.to(dtype)
    base = torch.nn.functional.linear(a_l, weight.to(dtype), bias.to(dtype))
    got = memoir_down_proj_routed(a_l, memory, tokens_per_row, bank_bits, index, overlap, min_overlap, base=base)
    ref = memoir_down_proj_routed_reference(a_l, memory, tokens_per_row, bank_bits, index, overlap, min_overlap,
                                            base=base)
    assert got.dtype == dtype and got.shape == exact.shape
    assert (got.float() - exact).abs().max().item() <= 2 * (ref.float() - exact).abs().max().item() + 1e-4
    gated = (overlap >= min_overlap).repeat_interleave(tokens_per_row)
    assert gated.any() and not gated.all()
    assert torch.equal(got[~gated], base[~gated])
    assert not torch.equal(got[gated], base[gated])


def test_triton_routed_with_row_index_tensor(triton_backend):
    """Tokens given a row each (not whole sequences in order): the kernel reads row_of_token."""
    a, _, _, memory, bank_bits, index, overlap, base = _routed_inputs(tokens_per_row=5, device=_device())
    rows = torch.randint(0, 4, (a.shape[0],), device=a.device)
    got = memoir_down_proj_routed(a, memory, rows, bank_bits, index, overlap, 9, base=base)
    want = memoir_down_proj_routed_reference(a, memory, rows, bank_bits, index, overlap, 9, base=base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_triton_routed_op_passes_opcheck(triton_backend):
    a, _, _, memory, bank_bits, index, overlap, base = _routed_inputs(tokens_per_row=1, device=_device())
    utils = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.memoir.down_proj_routed_triton.default,
                          (a, memory, None, 1, bank_bits, index, overlap, 9, base), test_utils=utils)


@pytest.mark.parametrize("tokens", [pytest.param(3, id="gather-T3"), pytest.param(40, id="dense-T40")])
def test_every_autotuning_config_matches_reference(triton_backend, monkeypatch, tokens):
    """The GPU path goes through triton.autotune: each candidate tile is run by the autotuner
    itself (its benchmark function replaced by one that keeps each candidate's output) and compared
    with the reference; then the fastest is the one used. On CPU the interpreter runs the configs,
    so the GPU-only plumbing (autotuner, grid from the chosen tile) is exercised here too."""
    import memoir_kernels.down_proj as down_proj

    tuner = down_proj._down_proj_gather_tuned if tokens <= down_proj.DECODE_MAX_TOKENS else down_proj._down_proj_dense_tuned
    outputs = []

    def keep_output(kernel_call, quantiles):
        kernel_call()
        outputs.append(tuner.nargs["out_ptr"].clone())
        return [float(len(outputs) % len(tuner.configs))] * len(quantiles)  # the last candidate "wins"

    monkeypatch.setattr(down_proj, "interpreting", lambda: False)  # take the GPU launch path
    monkeypatch.setenv("MEMOIR_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(tuner, "_do_bench", keep_output)
    monkeypatch.setattr(tuner, "cache", {})
    a, weight, memory, rows, masks, gate, bias = (x.to(_device()) for x in _inputs(tokens=tokens, dim=300, hidden=40))
    bits = pack_bits(masks)
    want = memoir_down_proj_reference(a, weight, memory, rows, bits, gate, bias)
    got = memoir_down_proj(a, weight, memory, rows, bits, gate, bias)
    assert len(outputs) == len(tuner.configs) >= 4
    for config, out in zip(tuner.configs, outputs, strict=True):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3, msg=lambda m, c=config: f"{c}: {m}")
    assert tuner.best_config is tuner.configs[-1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("tokens", [pytest.param(3, id="gather-T3"), pytest.param(40, id="dense-T40")])
def test_autotuning_off_launches_the_first_config_untuned(triton_backend, monkeypatch, tokens):
    """MEMOIR_TRITON_AUTOTUNE=0: the first candidate tile, launched without any benchmarking."""
    import memoir_kernels.down_proj as down_proj

    def no_benchmark(kernel_call, quantiles):
        raise AssertionError("autotuning ran although MEMOIR_TRITON_AUTOTUNE=0")

    monkeypatch.setattr(down_proj, "interpreting", lambda: False)
    monkeypatch.setenv("MEMOIR_TRITON_AUTOTUNE", "0")
    for tuner in (down_proj._down_proj_gather_tuned, down_proj._down_proj_dense_tuned):
        monkeypatch.setattr(tuner, "_do_bench", no_benchmark)
        monkeypatch.setattr(tuner, "cache", {})
    a, weight, memory, rows, masks, gate, bias = (x.to(_device()) for x in _inputs(tokens=tokens, dim=300, hidden=40))
    bits = pack_bits(masks)
    got = memoir_down_proj(a, weight, memory, rows, bits, gate, bias)
    torch.testing.assert_close(got, memoir_down_proj_reference(a, weight, memory, rows, bits, gate, bias),
                               rtol=1e-4, atol=1e-3)
