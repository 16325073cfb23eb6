"""Language-model head and cross-entropy in one autograd step, for the fast editing path.

The edit loss needs the full-vocabulary logits of a few dozen target positions. Built from
``linear`` + ``cross_entropy``, autograd keeps the logits, the log-softmax and a zero-filled
gradient, three fresh ``[n, V]`` buffers per iteration (on SmolLM2, V = 49152, they cost more
than the matrix products). Here the gradient with respect to the hidden states is computed in the
forward pass from one logits buffer, turned into probabilities in place, so nothing of size
``[n, V]`` outlives the call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["linear_cross_entropy", "row_mean_weights", "loss_dtype"]


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The edit loss is computed in float32, or in the model's dtype when that is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, workspace):
        # Every [n, V] step works in place in ``workspace``: fresh buffers of that size cost page
        # faults that, on a CPU, take longer than the arithmetic.
        logits = torch.mm(hidden.to(workspace.dtype), weight.t().to(workspace.dtype), out=workspace)
        if bias is not None:
            logits += bias
        picked = logits.gather(1, labels[:, None]).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        exps = logits.sub_(row_max).exp_()
        total = exps.sum(dim=1, keepdim=True)
        log_normaliser = (row_max + total.log()).squeeze(1)
        loss = ((log_normaliser - picked) * token_weights).sum()
        if ctx.needs_input_grad[0]:
            # d loss / d logits = w * (softmax - onehot), formed in the same buffer.
            probs = exps.div_(total)
            probs[torch.arange(len(labels), device=labels.device), labels] -= 1.0
            probs.mul_(token_weights[:, None])
            ctx.save_for_backward((probs @ weight.to(probs.dtype)).to(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                         token_weights: torch.Tensor, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i token_weights[i] * CE(head(hidden[i]), labels[i])`` with a gradient for ``hidden`` only.

    Args:
        hidden: ``[n, d]`` final-norm outputs at the positions that predict a target token.
        head: the model's output projection (weight ``[V, d]``, optional bias ``[V]``); frozen.
        labels: ``[n]`` int64 target token ids.
        token_weights: ``[n]`` weight of each token's cross-entropy, in the workspace's dtype.
        workspace: optional ``[n, V]`` buffer, overwritten; its dtype is the loss's (default
            float32, or ``hidden``'s when wider); pass the same one on every iteration to avoid
            allocating it each time.

    Returns:
        A scalar loss in the workspace's dtype, equal (up to float rounding) to the same sum over
        ``torch.nn.functional.cross_entropy(head(hidden), labels, reduction="none")``.
    """
    if workspace is None:
        workspace = hidden.new_empty((hidden.shape[0], head.weight.shape[0]), dtype=loss_dtype(hidden.dtype))
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, token_weights, workspace)


def row_mean_weights(rows: torch.Tensor, num_rows: int, dtype: torch.dtype = torch.float32,
                     row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` weights turning a weighted token sum into the mean over rows of each row's mean.

    ``rows[i]`` is the batch row of token ``i``; a row without tokens contributes zero to the mean.
    With ``row_weights [num_rows]`` the mean over rows is weighted: row r counts
    ``row_weights[r] / row_weights.sum()``.
    """
    ones = torch.ones(len(rows), dtype=dtype, device=rows.device)
    counts = ones.new_zeros(num_rows).index_add(0, rows, ones)
    if row_weights is None:
        return 1.0 / (counts[rows] * num_rows)
    share = row_weights.to(dtype=dtype, device=rows.device)
    return share[rows] / (counts[rows] * share.sum())
