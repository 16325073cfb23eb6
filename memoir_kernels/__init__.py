"""memoir_kernels: the hot-path ops of MEMOIR editing, with exact PyTorch references.

Importable without CUDA and without transformers. Every public op is one registered
``torch.library`` op (``torch.ops.memoir.<name>``: the PyTorch reference on every device, the
compiled and Triton kernels for CPU and CUDA tensors, a fake implementation for tracing), and
picks its kernel through one switch,
``MEMOIR_BACKEND=auto|native|triton|torch`` (see :mod:`memoir_kernels.backend`), read once;
:func:`set_backend` / :func:`use_backend` change it at run time.
"""

from ._bits import num_words, pack_bits, unpack_bits
from .backend import available_backends, requested_backend, resolve_backend, set_backend, use_backend
from .down_proj import (
    masked_residual,
    memoir_down_proj,
    memoir_down_proj_reference,
    memoir_down_proj_routed,
    memoir_down_proj_routed_reference,
)
from .mask_search import mask_search, mask_search_reference
from .mask_search_topk import mask_search_topk, mask_search_topk_reference
from .tophash import inverse_permutation, prompt_keys, tophash, tophash_from_keys, tophash_reference
from .tophash_residual import tophash_residual, tophash_residual_reference

__all__ = [
    "available_backends",
    "inverse_permutation",
    "mask_search",
    "mask_search_reference",
    "mask_search_topk",
    "mask_search_topk_reference",
    "masked_residual",
    "memoir_down_proj",
    "memoir_down_proj_reference",
    "memoir_down_proj_routed",
    "memoir_down_proj_routed_reference",
    "num_words",
    "pack_bits",
    "prompt_keys",
    "requested_backend",
    "resolve_backend",
    "set_backend",
    "tophash",
    "tophash_from_keys",
    "tophash_reference",
    "tophash_residual",
    "tophash_residual_reference",
    "unpack_bits",
    "use_backend",
]
