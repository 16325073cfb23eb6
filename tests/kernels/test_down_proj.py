import pytest
import torch

from memoir_kernels import memoir_down_proj, memoir_down_proj_reference, pack_bits


def _inputs(tokens=7, dim=70, hidden=33, rows=3, dtype=torch.float32):
    a = torch.randn(tokens, dim, dtype=dtype)
    weight, memory = torch.randn(hidden, dim, dtype=dtype), torch.randn(dim, hidden)
    bias = torch.randn(hidden, dtype=dtype)
    masks = torch.rand(rows, dim) < 0.3
    row_of_token = torch.randint(0, rows, (tokens,))
    gate = torch.tensor([True, False, True][:rows])
    return a, weight, memory, row_of_token, masks, gate, bias


@pytest.mark.parametrize("impl", [memoir_down_proj, memoir_down_proj_reference], ids=["dispatch", "reference"])
def test_matches_dense_formula(impl):
    a, weight, memory, rows, masks, gate, bias = _inputs()
    y = impl(a, weight, memory, rows, pack_bits(masks), gate, bias)
    expected = a @ weight.T + bias
    for t in range(a.shape[0]):
        if gate[rows[t]]:
            expected[t] += (a[t] * masks[rows[t]]) @ memory
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


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
