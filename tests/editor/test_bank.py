"""The mask bank grows in place (capacity doubling) and finds duplicates with the mask search."""

import torch

from memoir.layer import MemoirLayer
from memoir_kernels import pack_bits


def _random_masks(count: int, dim: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, dim, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(dim, generator=generator)[:k]] = True
    return pack_bits(masks)


def test_bank_appends_without_copying_and_skips_duplicates():
    layer = MemoirLayer(torch.nn.Linear(100, 8), top_k=30, irr_threshold=0.5, key_aggregation="mean", seed=0)
    masks = _random_masks(40, 100, 30)
    storages, added_rows = [], []
    for i in range(40):
        row, added = layer.add_mask(masks[i : i + 1])
        added_rows.append((row, added))
        storages.append(layer._bank_storage.data_ptr())
    assert added_rows == [(i, True) for i in range(40)]
    assert torch.equal(layer.bank_bits, masks)  # every row as it was stored
    # The storage moved only when full: at 16 and 32 rows (capacity 16 -> 32 -> 64).
    moves = [i for i in range(1, 40) if storages[i] != storages[i - 1]]
    assert moves == [16, 32]
    assert layer.add_mask(masks[7:8]) == (7, False) and layer.num_masks == 40
    layer.bank_bits = masks[:3]  # a loaded bank replaces the storage
    assert layer.num_masks == 3 and torch.equal(layer.bank_bits, masks[:3])
    assert layer.add_mask(masks[3:4]) == (3, True)
