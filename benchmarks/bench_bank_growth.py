"""Bank growth: masks added one at a time with ``MemoirLayer.add_mask``, the product's path.

    OMP_NUM_THREADS=1 taskset -c 1 python -m pytest benchmarks/bench_bank_growth.py --benchmark-only \
        --benchmark-json bank_growth.json

``MEMOIR_BANK_GROWTH_MASKS`` masks (default 100,000) of D = 14336 positions (LLaMA-3-8B's MLP width)
with k = 4096 active positions each, random and packed as the layer stores them, are added to the
layer wrapping a ``Linear(14336, 8)`` (so W_m stays small). Each add is what an edit does to the
bank: a mask search over the stored masks to find a duplicate (two masks of k bits are equal
exactly when they overlap in k positions), then an append to storage whose capacity doubles when
full. Masks are generated in chunks outside the timed adds.

Two cases: ``add_mask`` as the product runs it, and ``storage_only``, the same adds with the
duplicate search stubbed out (it finds nothing), which isolates the storage. Recorded in
``extra_info``: the total seconds of the adds, the median seconds per add of the first and of the
last 1,000 adds, and the same split into the duplicate search (timed by wrapping the
``mask_search`` that ``memoir.layer`` calls) and the rest of ``add_mask``. The storage is what must
stay flat (amortised O(1): no copy of the bank per add); the search reads the whole bank, so it
grows linearly with the number of stored masks (about 9 ms at 100k masks on one CPU core), and
the rest of ``add_mask`` after it pays cache misses for the bank it streamed. Reallocations (the
capacity doubling) are counted, with the slowest add that triggered one.
"""

import os
import statistics
import time

import pytest
import torch
import torch.nn as nn

import memoir.layer as layer_module
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


class _SearchTimer:
    """Wraps the layer module's ``mask_search``: adds each call's seconds to ``seconds``."""

    def __init__(self, search):
        self.search, self.seconds = search, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.search(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _grow(layer: MemoirLayer, count: int, timer: _SearchTimer) -> dict:
    generator = torch.Generator().manual_seed(0)
    add_s, search_s, reallocations = [], [], []
    for first in range(0, count, CHUNK):
        masks = _random_masks(min(CHUNK, count - first), generator)
        for row in range(masks.shape[0]):
            bits = masks[row : row + 1]
            capacity = layer._bank_storage.shape[0]
            searched = timer.seconds
            start = time.perf_counter()
            index, added = layer.add_mask(bits)
            add_s.append(time.perf_counter() - start)
            search_s.append(timer.seconds - searched)
            assert added and index == first + row  # random masks of 4096 in 14336 never coincide
            if layer._bank_storage.shape[0] != capacity:
                reallocations.append((first + row, add_s[-1]))
    return {"add_s": add_s, "search_s": search_s, "reallocations": reallocations}


def _no_match(query_bits, bank_bits):
    """Stands in for the duplicate search in the storage-only case: never a match."""
    batch = query_bits.shape[0]
    return torch.full((batch,), -1, dtype=torch.int64), torch.zeros(batch, dtype=torch.int32)


@pytest.mark.parametrize("path", ["add_mask", "storage_only"])
def test_bank_growth_one_mask_at_a_time(benchmark, record, path):
    """``add_mask``: the product's path, duplicate search included. ``storage_only``: the same adds
    with the search replaced by a stub that finds nothing, which isolates the growing storage (the
    search streams the whole bank through the caches, which also slows the Python around it)."""
    layer = MemoirLayer(nn.Linear(DIM, HIDDEN, bias=False), top_k=TOP_K, irr_threshold=0.5,
                        key_aggregation="last", seed=0)
    search = getattr(layer_module, "mask_search", None)
    if search is None:
        pytest.skip("memoir.layer no longer calls a module-level mask_search to time")
    timer = _SearchTimer(search if path == "add_mask" else _no_match)
    layer_module.mask_search = timer
    try:
        benchmark.group = "bank-growth"
        result = benchmark.pedantic(_grow, args=(layer, MASKS, timer), rounds=1, iterations=1)
    finally:
        layer_module.mask_search = search
    assert layer.num_masks == MASKS
    if path == "add_mask":
        again = layer.bank_bits[MASKS // 2 : MASKS // 2 + 1].clone()
        assert layer.add_mask(again) == (MASKS // 2, False)  # a stored mask is found, not stored twice

    add_s, search_s = result["add_s"], result["search_s"]
    rest_s = [a - s for a, s in zip(add_s, search_s, strict=True)]

    def medians(values):
        first, last = statistics.median(values[:WINDOW]), statistics.median(values[-WINDOW:])
        return first, last, last / first if first > 0 else float("nan")

    first, last, ratio = medians(add_s)
    search_first, search_last, search_ratio = medians(search_s)
    rest_first, rest_last, rest_ratio = medians(rest_s)
    record(path=path, masks=MASKS, dim=DIM, top_k=TOP_K, window=WINDOW, total_s=sum(add_s),
           first_median_s=first, last_median_s=last, last_vs_first=ratio,
           search_total_s=sum(search_s), search_first_median_s=search_first, search_last_median_s=search_last,
           search_last_vs_first=search_ratio, rest_first_median_s=rest_first, rest_last_median_s=rest_last,
           rest_last_vs_first=rest_ratio, rest_max_s=max(rest_s),
           bank_mib=layer.bank_bits.numel() * 8 / 2**20, capacity=int(layer._bank_storage.shape[0]),
           reallocations=len(result["reallocations"]),
           slowest_reallocating_add=max(result["reallocations"], key=lambda item: item[1], default=None))
