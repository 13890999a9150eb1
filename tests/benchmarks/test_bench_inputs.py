"""`gelato-bench gsm8k` with input it cannot use as given: options the plan would drop, `--data`
files that are not GSM8K-shaped, a comparison with no fixed-K run, and a run stopped by Ctrl-C or
SIGTERM. Each is a precise message (exit 2 before anything starts; 130/143 when stopped), never a
traceback or a silently different run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gelato.benchmarks import bench
from gelato.benchmarks.bench_report import target_lines, targets
from gelato.benchmarks.bench_run import DataError, read_questions
from gelato.tiny.random_pair import synthetic_problem


def check(*argv: str) -> str:
    return bench.check_args(bench.build_parser().parse_args(["gsm8k", "--no-plots", *argv]))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # Budgets scale the cheapest fixed-K's J/token: without one, no budgeted run would be made.
        (["--policies", "ar-edge,gelato"], "--policies has no fixed-K with K >= 1"),
        (["--policies", "fixed-0,lyapunov"], "--policies has no fixed-K with K >= 1"),
        (["--policies", "gelato", "--budget-factors", "", "--v", "5"], "--v: V applies to the budgeted"),
        (["--policies", "fixed-2,entropy", "--v", "5"], "--v: V applies to the budgeted"),
        (["--policies", "fixed-2,gelato", "--pipeline", "off", "--ahead-blocks", "3"], "--ahead-blocks: only lyapunov"),
        (["--policies", "fixed-2", "--pipeline", "send-ahead", "--ahead-blocks", "3"], "--ahead-blocks: only"),
    ],
)
def test_options_the_plan_would_drop_are_refused(argv: list[str], needle: str) -> None:
    assert needle in check(*argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--policies", "ar-edge,gelato", "--budgets", "0.01", "--v", "5"],  # ē given: no fixed-K needed
        ["--policies", "ar-edge,gelato", "--budget-factors", ""],  # no budgeted runs, none asked for
        ["--policies", "fixed-2,gelato", "--pipeline", "send-ahead", "--ahead-blocks", "3", "--v", "5"],
        ["--policies", "fixed-1,entropy"],
    ],
)
def test_plans_that_use_every_option_pass(argv: list[str]) -> None:
    assert check(*argv) == ""


def test_data_files_are_checked_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"q\.jsonl:4: not JSON"):
        read_questions(path, 10)
    assert [r["question"] for r in read_questions(path, 2)] == ["a", "b"]  # lines past --limit unread
    path.write_text('{"prompt": "hi"}\n')
    with pytest.raises(DataError, match=r'q\.jsonl:1: no "question" string'):
        read_questions(path, 10)
    path.write_text('{"question": "q", "answer": 42}\n')
    with pytest.raises(DataError, match=r'q\.jsonl:1: "answer" must be a string'):
        read_questions(path, 10)
    path.write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match="cannot read it as UTF-8"):
        read_questions(path, 10)


@pytest.mark.parametrize(
    ("lines", "argv", "needle"),
    [
        (['{"question": "q"}', "oops"], [], "q.jsonl:2: not JSON"),
        (['{"question": "q"}'], ["--devices", "2"], "holds 1 question(s), fewer than --devices 2"),
        (None, [], "GSM8K test split not found"),
    ],
)
def test_bad_data_is_a_usage_error_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str] | None, argv: list[str], needle: str
) -> None:
    data = tmp_path / "q.jsonl"
    if lines is not None:
        data.write_text("\n".join(lines) + "\n")
    argv = ["gsm8k", "--channel", "none", "--limit", "2", "--no-plots", "--data", str(data), *argv]
    with pytest.raises(SystemExit) as exit_:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no channel, edge or folder was made


def test_no_fixed_k_run_is_not_measured_not_short() -> None:
    """`--budgets` with no fixed-K in `--policies`: gelato has no fixed-K to be compared with. The
    target is not measured (met None), as the oracle's is without an oracle row, never "FALLS SHORT"
    beside a literal "(None)"."""
    rows = [
        {"label": "ar-edge", "policy": "ar-edge", "family": "reference", "tokens_per_s": 100.0},
        {"label": "gelato", "policy": "gelato", "family": "gelato", "tokens_per_s": 150.0, "energy_j_per_token": 0.1},
    ]
    t = targets(rows, [], 8)
    assert t["gelato"][0]["met"] is None and t["gelato"][0]["best_fixed"] is None
    line = target_lines(t)[0]
    assert "not measured (no fixed-K run)" in line and "FALLS SHORT" not in line and "None" not in line


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "15")])
def test_a_stopped_run_keeps_what_finished_in_one_line(
    pair: dict[str, Path], tmp_path: Path, sig: signal.Signals, code: int, word: str
) -> None:
    """Ctrl-C (or SIGTERM) once the reference run has finished: one line and 130 (143), no traceback;
    the finished configuration kept in partial/ as a failed run keeps it, no work/ left behind."""
    rng = random.Random(5)
    data = tmp_path / "q.jsonl"
    rows = [dict(zip(("question", "answer"), synthetic_problem(rng), strict=True)) for _ in range(2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gelato.benchmarks.bench", "gsm8k", "--channel", "none", "--limit", "2"]
    cmd += ["--data", str(data), "--out", str(out), "--target", str(pair["target"]), "--drafter"]
    cmd += [str(pair["drafter_agree"]), "--max-new-tokens", "400", "--policies", "ar-edge,fixed-1,fixed-2"]
    cmd += ["--budget-factors", "", "--no-assisted", "--no-oracle", "--no-plots", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # until fixed-1, the second run, has begun
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("work/fixed-1*")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"gelato-bench: {'interrupted' if code == 130 else 'stopped by signal'}" in err
    assert word in err
    partial = json.loads((out / "partial" / "partial.json").read_text())
    assert [r["label"] for r in partial["runs"]] == ["ar-edge"] and partial["error"] in err
    assert not (out / "work").exists() and not (out / "summary.json").exists()


def test_a_stop_while_the_references_run_keeps_every_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped after the device runs (assisted generation, the oracle: minutes), the same way: one
    line, 128 + signal, every finished configuration in partial/, work/ gone."""
    from gelato.benchmarks.bench_run import RunResult, RunSpec

    (tmp_path / "work").mkdir()
    done = [
        RunResult(
            RunSpec("fixed-4", "fixed-4", "fixed"),
            [{"question": 0, "device": 0, "n_tokens": 3, "elapsed_s": 0.1, "token_ids": [1]}],
            [],
        )
    ]
    assert bench.stopped(SystemExit(143), tmp_path, "cmd", done) == 143
    assert "gelato-bench: stopped by signal 15" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    assert [r["label"] for r in json.loads((tmp_path / "partial" / "partial.json").read_text())["runs"]] == ["fixed-4"]
    assert bench.stopped(KeyboardInterrupt(), tmp_path, "cmd", done) == 130
