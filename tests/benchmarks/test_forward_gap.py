"""The forward-after-a-gap benchmark (`gelato.benchmarks.forward_gap`) with tiny settings, as a user
runs it (a real process on the built-in pair): complete output, gap 0 as the reference of every
row, precise usage errors. No timing thresholds: speed is the benchmark's job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gelato.benchmarks import forward_gap as fg


def test_runs_end_to_end_and_reports_every_model_and_gap(tmp_path: Path) -> None:
    out = tmp_path / "gap"
    cmd = [sys.executable, "-m", "gelato.benchmarks.forward_gap", "--gaps-ms", "0,2", "--repeats", "1"]
    cmd += ["--calls", "3", "--context", "16", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["gaps_ms"] == [0.0, 2.0] and data["context"] == 16
    assert [(r["model"], r["how"]) for r in data["rows"]] == [
        ("drafter", "sleep"),
        ("drafter", "spin"),
        ("target", "sleep"),
        ("target", "spin"),
    ]
    assert all(len(r["ms"]) == 2 and all(ms > 0 for ms in r["ms"]) for r in data["rows"])
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Forward after a gap") and "| drafter | sleep | " in md and "(1.00×)" in md
    assert "Command: `python -m gelato.benchmarks.forward_gap --gaps-ms 0,2" in md


def test_a_gap_is_waited_either_way() -> None:
    import time

    for how in ("sleep", "spin"):
        t0 = time.perf_counter()
        fg._wait(0.01, how)
        assert time.perf_counter() - t0 >= 0.01
    t0 = time.perf_counter()
    fg._wait(0.0, "spin")
    assert time.perf_counter() - t0 < 0.1  # no wait at all (a generous bound: the machine may be busy)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gaps-ms", "1,5"], "must start with 0"),
        (["--gaps-ms", "0,x"], "not a comma list"),
        (["--gaps-ms", "0,-1"], "no negative gap"),
        (["--repeats", "0"], "must be >= 1"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        fg.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
