"""Soak: a long stream of edits on a tiny model, then routing and save/load.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_soak.py --benchmark-only --benchmark-json soak.json

``MEMOIR_SOAK_EDITS`` edits (default 20,000) with 2 SGD steps each and the preset's rehearsal, on a
random 4-layer LLaMA (D = 512) with SmolLM2's tokenizer. What must stay flat across the stream is
recorded in ``extra_info``: the median seconds per edit of the first and of the last 1,000 edits
(the bank grows in place, the registry is indexed, rehearsal's choice is one top-r search) and the
resident memory at every 1,000 edits. Then 64 prompts are routed and the memory is saved and
loaded back (bitwise the same).
"""

import os
import statistics
import tempfile
import time

import torch

import memoir
from memoir import MemoirConfig

EDITS = int(os.environ.get("MEMOIR_SOAK_EDITS", "20000"))
WINDOW = min(1000, max(1, EDITS // 4))


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stream(editor, count: int) -> tuple[list[float], dict[int, float]]:
    seconds, rss = [], {}
    for i in range(count):
        start = time.perf_counter()
        editor.edit(f"Fact {i}: the code of item {i * 7919 % 100003} is", f"{i % 997}")
        seconds.append(time.perf_counter() - start)
        if (i + 1) % WINDOW == 0:
            rss[i + 1] = _rss_mib()
    return seconds, rss


def test_soak_stream_then_route_and_reload(benchmark, record):
    from memoir.models import load_smollm2, tiny_model

    _, tokenizer = load_smollm2()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    config = MemoirConfig(n_iter=2, early_stop_loss=0.0, context_lengths=(3,), context_seeds=("I",), top_k=146,
                          irr_threshold=0.9)
    editor = memoir.attach(model, tokenizer, config)
    editor.fit_background(["Numbers: 1 2 3", "What time is it?", "The weather is mild today."])
    benchmark.group = "soak"
    seconds, rss = benchmark.pedantic(_stream, args=(editor, EDITS), rounds=1, iterations=1)
    prompts = [f"Fact {i}: the code of item {i * 7919 % 100003} is" for i in range(0, EDITS, max(1, EDITS // 64))]
    start = time.perf_counter()
    routed = editor.route(prompts)
    route_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        editor.save(directory)
        save_s = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        memory, bank = editor.layer.memory.detach().clone(), editor.layer.bank_bits.clone()
        editor.detach()
        start = time.perf_counter()
        loaded = memoir.load(model, tokenizer, directory)
        load_s = time.perf_counter() - start
        assert torch.equal(loaded.layer.memory, memory) and torch.equal(loaded.layer.bank_bits, bank)
        assert len(loaded.edits) == EDITS
        loaded.detach()
    first, last = statistics.median(seconds[:WINDOW]), statistics.median(seconds[-WINDOW:])
    record(edits=EDITS, masks=int(bank.shape[0]), first_median_s=first, last_median_s=last,
           last_vs_first=last / first, rss_mib=rss, rss_growth_mib=rss[max(rss)] - rss[min(rss)],
           route_64_s=route_s, gated=sum(routed["gate"]), save_s=save_s, load_s=load_s, saved_bytes=size)
