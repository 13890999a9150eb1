"""The README's first command, `gelato-demo`: real edge and device processes, a results table with
device energy named by source, and a losslessness check that can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gelato.benchmarks.demo import device_j_per_token, mismatches


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "gelato.benchmarks.demo", "--pair", "random", "--prompts", "2"]
    cmd += ["--max-new-tokens", "12", "--policies", "fixed-0,fixed-3", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| fixed-3 | 2 | 24 |" in res.stdout  # 2 prompts x 12 tokens
    assert "checked token for token against fixed-0's: identical" in res.stdout
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    assert rows["fixed-0"]["rounds"] == 24 and rows["fixed-3"]["mean_draft_len"] == 3.0
    for row in rows.values():
        assert row["energy_j_per_token"] > 0  # some meter always answers here: at least cpu-model
        assert all(e.endswith(("(measured)", "(estimated)")) for e in row["energy"])


def rec(ids: list[int], energy_j: float | None = 1.0) -> dict[str, Any]:
    return {"token_ids": ids, "energy_j": energy_j}


def test_mismatches_names_policy_and_prompt() -> None:
    runs = {"fixed-0": [rec([1, 2]), rec([3])], "fixed-4": [rec([1, 2]), rec([3, 9])]}
    assert mismatches(runs, "fixed-0") == ["fixed-4: prompt 1"]
    assert mismatches({"a": [rec([1])], "b": [rec([1])]}, "a") == []


def test_device_energy_unavailable_is_none_not_zero() -> None:
    assert device_j_per_token([rec([1], 2.0), rec([2], 4.0)], 3) == 2.0
    assert device_j_per_token([rec([1], 2.0), rec([2], None)], 3) is None
    assert device_j_per_token([rec([], 2.0)], 0) is None
