"""The mask bank grows in place (capacity doubling) and finds duplicates through a hash of each row."""

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
    assert layer.add_mask(masks[1:2]) == (1, False)  # the duplicate index follows a loaded bank


def test_duplicates_are_confirmed_against_the_stored_row(monkeypatch):
    """Every mask hashing alike (the worst collision case) changes nothing: a hit is compared."""
    import memoir.layer as layer_module

    monkeypatch.setattr(layer_module, "_digest", lambda words: 0)
    layer = MemoirLayer(torch.nn.Linear(100, 8), top_k=30, irr_threshold=0.5, key_aggregation="mean", seed=0)
    masks = _random_masks(10, 100, 30, seed=1)
    assert [layer.add_mask(masks[i : i + 1]) for i in range(10)] == [(i, True) for i in range(10)]
    assert [layer.add_mask(masks[i : i + 1]) for i in (9, 0, 4)] == [(9, False), (0, False), (4, False)]
    assert torch.equal(layer.bank_bits, masks)
