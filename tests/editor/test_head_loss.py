"""The fused head + cross-entropy of the fast path against linear + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from memoir.head_loss import linear_cross_entropy, row_mean_weights


def _reference(hidden, head, labels, weights):
    return (F.cross_entropy(head(hidden).float(), labels, reduction="none") * weights).sum()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_value_and_gradient_match_cross_entropy(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias).requires_grad_(False)
    labels = torch.randint(0, 300, (7,))
    weights = row_mean_weights(torch.tensor([0, 0, 1, 1, 1, 2, 2]), 3)
    hidden = torch.randn(7, 16, requires_grad=True)
    reference_hidden = hidden.detach().clone().requires_grad_(True)

    loss = linear_cross_entropy(hidden, head, labels, weights, workspace=torch.full((7, 300), float("nan")))
    expected = _reference(reference_hidden, head, labels, weights)
    loss.backward()
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-5, atol=1e-7)


def test_no_gradient_needed_gives_the_same_loss():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden, labels = torch.randn(4, 8), torch.randint(0, 50, (4,))
    weights = torch.full((4,), 0.25)
    torch.testing.assert_close(linear_cross_entropy(hidden, head, labels, weights),
                               _reference(hidden, head, labels, weights), rtol=1e-6, atol=1e-6)


def test_row_mean_weights_average_each_row_then_the_rows():
    weights = row_mean_weights(torch.tensor([0, 0, 0, 2]), 3)  # row 1 has no tokens
    torch.testing.assert_close(weights, torch.tensor([1 / 9, 1 / 9, 1 / 9, 1 / 3]))
