"""`gelato.benchmarks.pipelining` end to end on the built-in pair: real edge, delay proxy and device
processes at two round trips, every run lossless against unpipelined gelato, send-ahead blocks
really sent, and the report's figures consistent with the runs they come from."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from gelato.benchmarks.pipelining import main, summarize_repeats, trace_pipeline_stats
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
    assert result["settings"]["repeats"] == 2 and result["settings"]["fixed"] == [2, 4]
    for r in result["rtts"]:
        runs = {x["label"]: x for x in r["runs"]}
        assert set(runs) >= {"ar-edge", "fixed-2", "fixed-4", "gelato", "gelato local", "gelato send-ahead"}
        assert r["lossless_reference"] == "ar-edge" and r["lossless_mismatches"] == []  # vs the target alone
        fixed = runs[f"{r['fastest_fixed']} send-ahead"]
        assert fixed["sent_ahead"] > 0  # fixed-K always sends ahead
        assert fixed["sent_ahead"] == fixed["ahead_verified"] + fixed["stale_blocks"]
        assert fixed["ahead_hit_rate"] == pytest.approx(fixed["ahead_verified"] / fixed["sent_ahead"])
        gelato = runs["gelato"]
        assert gelato["sent_ahead"] == gelato["stale_blocks"] == gelato["sent_empty"] == 0  # unpipelined: never
        assert r["budget_j_per_token"] == runs[r["fastest_fixed"]]["energy_j_per_token"]
        ratio = runs["gelato send-ahead"]["tokens_per_s"] / runs[r["fastest_fixed"]]["tokens_per_s"]
        assert r["gelato_send_ahead_vs_fastest_fixed"] == pytest.approx(ratio)
    ten = [r for r in result["rtts"] if r["rtt_nominal_ms"] == 10.0]
    # The proxy really added the 10 ms round trip (the upper bound generous: a busy machine adds)
    assert all(8 < r["rtt_measured_ms"][0] < 40 for r in ten)
    md = (out / "results.md").read_text()
    assert "| 10 (" in md and "Losslessness: every output equals ar-edge's" in md and "the median of 2 repeats" in md
    # --report re-derives the same figures from the traces it wrote, and keeps what was measured.
    assert main(["--report", str(out)]) == 0
    rebuilt = json.loads((out / "results.json").read_text())
    assert rebuilt["summary"] == result["summary"] and "rebuilt" in rebuilt
    assert [x for r in rebuilt["rtts"] for x in r["runs"]] == [x for r in result["rtts"] for x in r["runs"]]


def test_pipeline_stats_from_a_trace(tmp_path: Path) -> None:
    rows = [
        {"emitted": 3, "k": 4, "sent_ahead": False, "stale_blocks": 2, "wasted_tokens": 8, "wasted_j": 0.004},
        {"emitted": 5, "k": 4, "sent_ahead": True, "stale_blocks": 0, "wasted_tokens": 0, "wasted_j": 0.0},
        {"emitted": 2, "k": 2, "sent_ahead": True, "stale_blocks": 0, "predrafted": 3, "predraft_hit": True},
        {"emitted": 1, "k": 0, "sent_ahead": True, "follow": True, "stale_blocks": 0},
    ]
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    s = trace_pipeline_stats(path)
    # Two blocks with drafts verified, two stale: four sent ahead; the empty one counted apart.
    assert (s["sent_ahead"], s["ahead_verified"], s["stale_blocks"], s["sent_empty"]) == (4, 2, 2, 1)
    assert s["ahead_hit_rate"] == pytest.approx(0.5)
    assert s["wasted_tokens_per_token"] == pytest.approx(8 / 11)
    assert s["wasted_j_per_token"] == pytest.approx(0.004 / 11)
    assert s["predraft_hit_rate"] == 1.0


def test_repeats_summary_takes_the_median() -> None:
    """Three repeats with one outlier: the median, not the mean (4.0), and every value kept."""

    def entry(ratio: float, fastest: str) -> dict:
        runs = [{"label": "gelato send-ahead", "sent_ahead": 3, "ahead_verified": 1, "sent_empty": 0}]
        runs[0] |= {"ahead_hit_rate": 1 / 3, "wasted_j_per_token": 0.0}
        ratios = {k: ratio for k in ("gelato_send_ahead_vs_fastest_fixed", "gelato_send_ahead_vs_gelato")}
        ratios |= {k: 1.0 for k in ("gelato_local_vs_gelato", "gelato_send_ahead_no_budget_vs_fastest_fixed")}
        ratios |= {"fixed_send_ahead_vs_fixed": 1.0, "gelato_send_ahead_j_within_fastest_fixed": True}
        base = {"rtt_nominal_ms": 10.0, "rtt_measured_ms": [11.0, 11.0], "fastest_fixed": fastest, "runs": runs}
        return base | ratios

    (row,) = summarize_repeats([entry(1.0, "fixed-6"), entry(10.0, "fixed-4"), entry(1.0, "fixed-6")])
    assert row["gelato_send_ahead_vs_gelato"] == {"median": 1.0, "each": [1.0, 10.0, 1.0]}
    assert row["fastest_fixed"] == ["fixed-6", "fixed-4", "fixed-6"] and row["send_ahead_verified"] == [1, 1, 1]


@pytest.mark.parametrize("module", ["pipelining", "policies"])
def test_an_out_folder_holding_a_run_is_refused_without_force(
    module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Their default --out is a committed result: a second run does not overwrite one unasked."""
    import importlib

    run_main = importlib.import_module(f"gelato.benchmarks.{module}").main
    (tmp_path / "results.json").write_text("{}\n")
    with pytest.raises(SystemExit) as exc:
        run_main(["--out", str(tmp_path), "--data", str(tmp_path / "missing.jsonl")])
    assert exc.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}\n"
    with pytest.raises(SystemExit) as exc:  # with --force it goes on, here to the missing data
        run_main(["--out", str(tmp_path), "--force", "--data", str(tmp_path / "missing.jsonl")])
    assert "already holds a run" not in capsys.readouterr().err
