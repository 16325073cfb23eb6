"""Bank growth: masks added one at a time with ``MemoirLayer.add_mask``, the product's path.

    OMP_NUM_THREADS=1 taskset -c 1 python -m pytest benchmarks/bench_bank_growth.py --benchmark-only \
        --benchmark-json bank_growth.json

``MEMOIR_BANK_GROWTH_MASKS`` masks (default 100,000) of D = 14336 positions (LLaMA-3-8B's MLP width)
with k = 4096 active positions each, random and packed as the layer stores them, are added to the
layer wrapping a ``Linear(14336, 8)`` (so W_m stays small). Each add is what an edit does to the
bank: a duplicate check (a hash of the mask's words, confirmed against the stored row on a hit),
then an append to storage whose capacity doubles when full. Masks are generated in chunks outside
the timed adds.

Recorded in ``extra_info``: the total seconds of the adds, the median seconds per add of the first
and of the last 1,000 adds (flat is the goal: nothing in an add depends on the bank's size but the
reallocations, amortised), the reallocations and the slowest add that triggered one.
"""

import os
import statistics
import time

import torch
import torch.nn as nn

from memoir.layer import MemoirLayer
from memoir_kernels import pack_bits

MASKS = int(os.environ.get("MEMOIR_BANK_GROWTH_MASKS", "100000"))
WINDOW = min(1000, max(1, MASKS // 4))
DIM, TOP_K, HIDDEN = 14336, 4096, 8
CHUNK = 1000  # masks generated at a time, outside the timed adds


def _random_masks(count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, W]`` packed masks with TOP_K of DIM positions set, uniformly at random."""
    scores = torch.rand(count, DIM, generator=generator)
    mask = torch.zeros(count, DIM, dtype=torch.bool)
    mask.scatter_(1, scores.topk(TOP_K, dim=1).indices, True)
    return pack_bits(mask)


def _grow(layer: MemoirLayer, count: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    add_s, reallocations = [], []
    for first in range(0, count, CHUNK):
        masks = _random_masks(min(CHUNK, count - first), generator)
        for row in range(masks.shape[0]):
            bits = masks[row : row + 1]
            capacity = layer._bank_storage.shape[0]
            start = time.perf_counter()
            index, added = layer.add_mask(bits)
            add_s.append(time.perf_counter() - start)
            assert added and index == first + row  # random masks of 4096 in 14336 never coincide
            if layer._bank_storage.shape[0] != capacity:
                reallocations.append((first + row, add_s[-1]))
    return {"add_s": add_s, "reallocations": reallocations}


def test_bank_growth_one_mask_at_a_time(benchmark, record):
    layer = MemoirLayer(nn.Linear(DIM, HIDDEN, bias=False), top_k=TOP_K, irr_threshold=0.5,
                        key_aggregation="last", seed=0)
    benchmark.group = "bank-growth"
    result = benchmark.pedantic(_grow, args=(layer, MASKS), rounds=1, iterations=1)
    assert layer.num_masks == MASKS
    again = layer.bank_bits[MASKS // 2 : MASKS // 2 + 1].clone()
    assert layer.add_mask(again) == (MASKS // 2, False)  # a stored mask is found, not stored twice

    add_s = result["add_s"]
    first, last = statistics.median(add_s[:WINDOW]), statistics.median(add_s[-WINDOW:])
    record(path="add_mask", masks=MASKS, dim=DIM, top_k=TOP_K, window=WINDOW, total_s=sum(add_s),
           first_median_s=first, last_median_s=last, last_vs_first=last / first if first > 0 else float("nan"),
           max_s=max(add_s), bank_mib=layer.bank_bits.numel() * 8 / 2**20,
           capacity=int(layer._bank_storage.shape[0]), reallocations=len(result["reallocations"]),
           slowest_reallocating_add=max(result["reallocations"], key=lambda item: item[1], default=None))
