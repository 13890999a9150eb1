"""`gelato.benchmarks.pipelining` end to end on the built-in pair: real edge, delay proxy and device
processes at two round trips, every run lossless against unpipelined gelato, send-ahead blocks
really sent, and the report's figures consistent with the runs they come from."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from gelato.benchmarks.pipelining import main, pipeline_stats
from gelato.tiny.random_pair import synthetic_problem


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    rows = [dict(zip(("question", "answer"), synthetic_problem(rng), strict=True)) for _ in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pipelining_benchmark_end_to_end(questions: Path, tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    args = ["--rtts-ms", "0,10", "--n", "2", "--max-new-tokens", "24", "--fixed", "2,4", "--repeats", "2"]
    assert main([*args, "--data", str(questions), "--out", str(out)]) == 0  # 1: an output differed
    result = json.loads((out / "results.json").read_text())
    # Repeats interleave the round trips, each with its own traces; the summary takes medians.
    assert [(r["rtt_nominal_ms"], r["repeat"]) for r in result["rtts"]] == [(0.0, 1), (10.0, 1), (0.0, 2), (10.0, 2)]
    assert (out / "rtt10_r2" / "traces" / "gelato_send-ahead.jsonl.gz").exists()
    for row in result["summary"]:
        reps = [r for r in result["rtts"] if r["rtt_nominal_ms"] == row["rtt_nominal_ms"]]
        each = [r["gelato_send_ahead_vs_gelato"] for r in reps]
        assert row["repeats"] == 2 and row["gelato_send_ahead_vs_gelato"]["each"] == each
        assert row["gelato_send_ahead_vs_gelato"]["median"] == pytest.approx(sum(each) / 2)
        assert row["fastest_fixed"] == [r["fastest_fixed"] for r in reps]
    for r in result["rtts"]:
        runs = {x["label"]: x for x in r["runs"]}
        assert set(runs) >= {"fixed-2", "fixed-4", "gelato", "gelato local", "gelato send-ahead"}
        assert r["lossless_mismatches"] == []
        fixed = runs[f"{r['fastest_fixed']} send-ahead"]
        assert fixed["sent_ahead"] + fixed["stale"] > 0  # fixed-K always sends ahead
        assert runs["gelato"]["sent_ahead"] == runs["gelato"]["stale"] == 0  # unpipelined: never
        assert r["budget_j_per_token"] == runs[r["fastest_fixed"]]["energy_j_per_token"]
        ratio = runs["gelato send-ahead"]["tokens_per_s"] / runs[r["fastest_fixed"]]["tokens_per_s"]
        assert r["gelato_send_ahead_vs_fastest_fixed"] == pytest.approx(ratio)
    assert 8 < r["rtt_measured_ms"][0] < 15  # the proxy really added the 10 ms round trip
    md = (out / "results.md").read_text()
    assert "| 10 (" in md and "Losslessness: every output" in md and "the median of 2 repeats" in md


def test_pipeline_stats_from_a_trace(tmp_path: Path) -> None:
    rows = [
        {"emitted": 3, "sent_ahead": False, "stale_blocks": 2, "wasted_tokens": 8, "wasted_j": 0.004},
        {"emitted": 5, "sent_ahead": True, "stale_blocks": 0, "wasted_tokens": 0, "wasted_j": 0.0},
        {"emitted": 2, "sent_ahead": True, "stale_blocks": 0, "predrafted": 3, "predraft_hit": True},
    ]
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    s = pipeline_stats(path)
    assert (s["sent_ahead"], s["stale"]) == (2, 2)
    assert s["ahead_hit_rate"] == pytest.approx(0.5)
    assert s["wasted_tokens_per_token"] == pytest.approx(0.8) and s["wasted_j_per_token"] == pytest.approx(4e-4)
    assert s["predraft_hit_rate"] == 1.0
