"""`gelato.benchmarks.edge_batching` end to end on the random pair: a real edge process, replaying
sessions over gRPC, float32 so every batched verdict must equal the solo one (the benchmark raises
otherwise), and a report whose counts agree with the runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gelato.benchmarks.edge_batching import divergence, main


def test_edge_batching_end_to_end(pair: dict[str, Path], tmp_path: Path) -> None:
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:  # main pins this process to one core and one thread: give them back to the test session
        args = ["--target", str(pair["target"]), "--drafter", str(pair["drafter_agree"]), "--sessions", "1,3"]
        args += ["--max-new-tokens", "8", "--reps", "1", "--unique-prompts", "2", "--out", str(tmp_path / "eb")]
        # A window long enough that the 3 sessions' blocks meet in a batch: with the default 2 ms,
        # two rounds each sometimes never coincided (1 run in 5 on the 2-core dev machine).
        args += ["--batch-window-ms", "20"]
        assert main(args) == 0
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "eb.json").read_text())
    levels = report["levels"]
    assert [r["sessions"] for r in levels] == [1, 3]
    for r in levels:
        assert 0 < r["tokens"] <= 8 * r["sessions"]
        assert r["verdicts_differing_from_solo"] == 0 and r["sessions_diverged"] == 0
        assert r["first_divergence_round_p50"] is None
        # 3 sessions really shared forwards (else "verdicts equal solo" compared no batch at all)
        assert (1.0 < r["mean_batch_rows"] <= 3) if r["sessions"] == 3 else r["mean_batch_rows"] == 1.0
        assert r["verify_step_ms_mean"] > 0  # per step, beside the per-verdict percentiles
    assert [r["rows"] for r in report["overhead"]] == [1, 3]
    md = (tmp_path / "eb.md").read_text()
    assert "sessions diverged" in md and md.count("\n| 3 |") == 2  # a batching row and an overhead row
    assert "per verdict" in md and "per step" in md


def test_divergence_counts_sessions_and_their_first_round() -> None:
    """In half precision a session leaves the recording at its first differing verdict: the
    sessions that did and the median round where, beside the count of differing verdicts."""
    runs = [{"mismatches": 0, "first_mismatch": None}, {"mismatches": 7, "first_mismatch": 3}]
    runs += [{"mismatches": 2, "first_mismatch": 10}, {"mismatches": 1, "first_mismatch": 4}]
    got = divergence(runs)
    assert got == {"verdicts_differing_from_solo": 10, "sessions_diverged": 3, "first_divergence_round_p50": 4}
    assert divergence(runs[:1])["first_divergence_round_p50"] is None


def test_percentiles_are_nearest_rank_over_n_minus_one() -> None:
    """p99 of 100 verdicts is the 99th, not the maximum (the rank was q·n, one too high where q·n
    is whole), and every percentile is ranked as `gelato-bench` ranks it."""
    import pytest

    from gelato.benchmarks.bench_run import percentile
    from gelato.benchmarks.edge_batching import _pct

    xs = [float(i) for i in range(1, 101)]
    assert _pct(xs, 0.99) == 99.0 and _pct(xs, 0.0) == 1.0 and _pct(xs, 1.0) == 100.0
    assert all(_pct(xs[:n], q) == percentile(xs[:n], q) for n in (1, 2, 7, 100) for q in (0.1, 0.5, 0.9, 0.99))
    with pytest.raises(ValueError, match="no verdict"):
        _pct([], 0.5)
