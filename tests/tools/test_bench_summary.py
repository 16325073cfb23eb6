"""tools/bench_summary.py: the issue's targets computed from pytest-benchmark JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench_summary.py"


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("bench_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case(group: str, seconds: float, **info) -> dict:
    return {"group": group, "name": f"test[{group}-{info}]", "stats": {"median": seconds}, "extra_info": info}


def gpu_run() -> list[dict]:
    search, decode = "mask_search gpu N=10000 B=1", "decode step (GPU 8B-shape bf16)"
    return [
        case("mask_search cpu N=10000 B=1", 2e-3, impl="memoir C++"),
        case("mask_search cpu N=10000 B=1", 3e-3, impl="faiss IndexBinaryFlat"),
        case(search, 10e-6, impl="memoir CUDA", pct_of_copy=81.0),
        case(search, 400e-6, impl="torch reference", pct_of_copy=2.0),
        case("tophash B=1 T=16", 50e-6, impl="torch chain"),
        case("tophash B=1 T=16", 20e-6, impl="triton"),
        case("down_proj T=1", 30e-6, impl="plain F.linear"),
        case("down_proj T=1", 45e-6, impl="triton (base given)"),
        case(decode, 10.0e-3, masks=0, routing="reuse"),
        case(decode, 10.1e-3, masks=10000, routing="reuse"),
    ]


def test_targets_are_ratios_of_medians_in_the_same_run(summary):
    measured = {name: (value, passes(value) if value is not None else None)
                for name, value, _, passes in summary.targets(gpu_run())}
    assert measured["CPU mask_search 10k B=1: faiss time / C++ time"] == (pytest.approx(1.5), True)
    assert measured["GPU mask_search 10k B=1: % of copy bandwidth"] == (81.0, True)
    assert measured["GPU mask_search 10k B=1: reference time / CUDA time"] == (pytest.approx(40.0), True)
    assert measured["GPU tophash B=1: torch chain time / Triton time"] == (pytest.approx(2.5), False)
    assert measured["GPU down_proj 1 token: edited time / plain time"] == (pytest.approx(1.5), False)
    assert measured["GPU decode, 10k edits, reused routing: overhead %"] == (pytest.approx(1.0), True)
    assert measured["GPU decode, 10k edits, routing each step: overhead %"] == (None, None)


def test_main_prints_missing_targets_as_not_measured(summary, tmp_path, capsys):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"benchmarks": gpu_run()[:2]}))
    assert summary.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "faiss time / C++ time" in out and "1.50  ok" in out
    assert out.count("not measured") == 7


def test_kernel_targets_use_device_times_when_both_cases_have_one(summary):
    run = gpu_run()
    # tophash: wall clock 50 / 20 us (launch path included), device 30 / 5 us: the device ratio (6) counts.
    run[4:8] = [
        case("tophash B=1 T=16", 50e-6, impl="torch chain", device_s=30e-6),
        case("tophash B=1 T=16", 20e-6, impl="triton", device_s=5e-6),
        case("down_proj T=1", 30e-6, impl="plain F.linear", device_s=25e-6),
        case("down_proj T=1", 45e-6, impl="triton (base given)"),  # no device time: wall ratio
    ]
    measured = {name: value for name, value, _, _ in summary.targets(run)}
    assert measured["GPU tophash B=1: torch chain time / Triton time"] == pytest.approx(6.0)
    assert measured["GPU down_proj 1 token: edited time / plain time"] == pytest.approx(1.5)


def test_table_shows_wall_and_device_time(summary):
    lines = summary.groups_table([case("tophash B=1 T=16", 20e-6, impl="triton", device_s=5e-6),
                                  case("mask_search cpu N=10000 B=1", 2e-3, impl="memoir C++")])
    assert "wall median" in lines[0] and "device" in lines[0]
    assert lines[1].split()[-3:] == ["2000.0", "us", "-"]  # CPU case: no device time
    assert lines[2].split()[-4:] == ["20.0", "us", "5.0", "us"]
