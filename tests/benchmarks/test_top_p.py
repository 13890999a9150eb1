"""The top-p benchmark (`gelato.benchmarks.top_p`) with tiny settings, as a user runs it (a real
process): complete output, both implementations agreeing on every row, precise usage errors. No
timing thresholds: speed is the benchmark's job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gelato.benchmarks import top_p as tp


def test_runs_end_to_end_and_reports_every_setting_spread_and_row_count(tmp_path: Path) -> None:
    out = tmp_path / "top_p"
    cmd = [sys.executable, "-m", "gelato.benchmarks.top_p", "--vocab", "3000", "--rows", "1,3"]
    cmd += ["--spreads", "6,0.5", "--repeats", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["vocab"] == 3000 and list(data["settings"]) == list(tp.SETTINGS)
    for rows in data["settings"].values():
        assert [(r["spread"], r["rows"]) for r in rows] == [(6.0, 1), (6.0, 3), (0.5, 1), (0.5, 3)]
        assert all(r["same"] and len(r["nucleus"]) == r["rows"] for r in rows)
        assert all(r["window_ms"] > 0 and r["full_sort_ms"] > 0 for r in rows)
    flat = data["settings"]["t0.7_top_p0.9"][2]
    assert flat["nucleus"][0] > 1024  # spread 0.5: past every window, the whole row was sorted
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Top-p filtering") and "## t0.7_top_p0.8_top_k20" in md and "| yes |" in md
    assert "Command: `python -m gelato.benchmarks.top_p --vocab 3000" in md


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "1,x"], "comma lists of numbers"),
        (["--rows", "0"], "--rows >= 1"),
        (["--spreads", "-1"], "--spreads > 0"),
        (["--vocab", "1"], "--vocab >= 2"),
        (["--repeats", "0"], "--repeats >= 1"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        tp.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
