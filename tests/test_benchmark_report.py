"""The benchmark's summaries and tables, from made-up measurements (no server, no CRIU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

MIB = 1 << 20


@pytest.fixture(scope="module")
def bench() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hibernate.py"
    spec = importlib.util.spec_from_file_location("kernelhib_benchmark", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def hibernation(**values: Any) -> dict[str, Any]:
    """One measured hibernation and wake of a 100 MiB kernel; ``values`` change some."""
    return {
        "engine": "criu", "hibernate_s": 1.0, "hibernate_server_s": 0.9, "wake_s": 0.4,
        "wake_post_s": 0.3, "memory_back_s": 0.35, "image_read_s": 0.3,
        "image_bytes": 100 * MIB, "stored_bytes": 100 * MIB, "written_bytes": 101 * MIB,
        "rss_bytes": 100 * MIB, "rss_anon_bytes": 90 * MIB, "rss_shmem_bytes": 0,
        "mem_available_gain_bytes": 99 * MIB, "freed_bytes": 99 * MIB,
        "freed_bytes_reported": 99 * MIB, "criu_dump_s": 0.5,
        "baseline": {"write_s": 1.0, "read_s": 0.3, "read_blake3_s": 0.35, "blake3_s": 0.1},
    } | values  # fmt: skip


def workload(runs: list[dict[str, Any]], kind: str = "numpy") -> dict[str, Any]:
    return {
        "workload": kind,
        "label": "0.1 GiB",
        "bytes": 100 * MIB,
        "runs": runs,
        "dill_runs": [],
        "plain_dill": [],
        "restarts": [{"restart_s": 2.0, "restart_post_s": 1.0}],
    }


def test_a_ratio_to_a_baseline_is_taken_within_each_run(bench: Any) -> None:
    runs = [
        hibernation(hibernate_s=1.1),
        hibernation(hibernate_s=2.0, baseline=hibernation()["baseline"] | {"write_s": 4.0}),
    ]

    summary = bench.summarize(workload(runs))

    # The median of the runs' own ratios (1.1 and 0.5); the ratio of the medians would be
    # 1.55 / 2.5 = 0.62.
    assert summary["ratios"]["hibernate_vs_write"] == pytest.approx(0.8)
    assert summary["targets_met"]["hibernate_vs_write"] is True


def test_each_kind_of_data_is_held_to_its_own_image_size_target(bench: Any) -> None:
    runs = [hibernation(stored_bytes=50 * MIB)]

    assert bench.summarize(workload(runs, "numpy"))["targets_met"]["stored_vs_rss"] is True
    assert bench.summarize(workload(runs, "dataframe"))["targets_met"]["stored_vs_rss"] is False


def test_all_memory_back_never_reached_is_reported_not_averaged(bench: Any) -> None:
    runs = [hibernation(memory_back_s=None), hibernation(memory_back_s=0.6)]

    summary = bench.summarize(workload(runs))

    assert summary["memory_back_median_s"] == 0.6
    assert summary["memory_back_missed"] == 1
    assert "0.60 s (1 never)" in bench.tables({"sizes": [workload(runs) | {"summary": summary}]})


def test_the_tables_show_every_workload_with_its_targets(bench: Any) -> None:
    criu = workload([hibernation(), hibernation()])
    criu["summary"] = bench.summarize(criu)
    again = {
        "engine": "criu",
        "first": hibernation(),
        "again": hibernation(hibernate_s=0.2, written_bytes=2 * MIB),
    }
    rehibernate = {"workload": "rehibernate", "label": "0.1 GiB, 1 % rewritten", "runs": [again]}
    rehibernate["summary"] = bench.summarize_rehibernate(rehibernate["runs"])
    pair = {"engine": "criu", "first": hibernation(), "second": hibernation()}
    imports = {"workload": "same_imports", "label": "import numpy", "runs": [pair]}
    imports["summary"] = bench.summarize_same_imports(imports["runs"])

    text = bench.tables({"sizes": [criu, rehibernate, imports]})

    assert "| 0.1 GiB | 2 | 1.00 / 1.00 s | 1.00 s | 0.40 / 0.40 s | 0.35 s | 0.30 s" in text
    assert "| 100 MiB / 100 MiB / 101 MiB |" in text
    assert "| criu | 1 | 1.00 s / 101 MiB / 100 MiB | 0.20 s / 2 MiB / 100 MiB " in text
    assert "| 0.20 (yes) | 0.02 (yes) |" in text
    assert "| criu | 1 | 100 MiB / 101 MiB | 100 MiB / 101 MiB / 100 MiB | 1.01 (**no**) |" in text
