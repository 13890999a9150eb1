"""`gelato.benchmarks.tail_recompute`: a recorded run's J/token with the radio tail as charged now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gelato.benchmarks import tail_recompute
from gelato.power import radio_profile


def _run(label: str, policy: str, j_per_token: float, devices: list[int], budget: float | None = None) -> dict:
    per_device = [{"device": i, "questions": q} for i, q in enumerate(devices)]
    return {
        "label": label,
        "policy": policy,
        "budget_j_per_token": budget,
        "energy_j_per_token": j_per_token,
        "tokens": 1000,
        "questions": sum(devices),
        "per_device": per_device,
    }


def test_each_device_keeps_one_tail_and_ar_device_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lte = radio_profile("lte")
    assert lte is not None
    tail_j = lte.tail_energy_j()
    summary = {
        "settings": {"radio": "lte"},
        "runs": [
            _run("fixed-4", "fixed-4", 0.2, [10]),
            _run("gelato", "gelato", 0.2, [4, 3, 3]),  # three devices: three tails kept
            _run("gelato ē", "gelato", 0.2, [10], budget=0.1),  # budgeted: left out
            _run("ar-device", "ar-device", 0.2, [10]),  # sends nothing: no tail at all
        ],
    }
    rows = {r["label"]: r for r in tail_recompute.recompute(summary)}
    assert set(rows) == {"fixed-4", "gelato", "ar-device"}
    assert rows["fixed-4"]["j_per_token"] == pytest.approx(0.2 - 9 * tail_j / 1000)
    assert rows["gelato"]["j_per_token"] == pytest.approx(0.2 - 7 * tail_j / 1000)
    assert rows["ar-device"]["j_per_token"] == pytest.approx(0.2 - 10 * tail_j / 1000)
    # Recorded after the ar-device fix, before the tail fix: ar-device was charged no tail.
    rows = {r["label"]: r for r in tail_recompute.recompute(summary, per_question=True, ar_device=False)}
    assert rows["ar-device"]["j_per_token"] == 0.2 and rows["ar-device"]["tails_removed"] == 0
    assert rows["fixed-4"]["j_per_token"] == pytest.approx(0.2 - 9 * tail_j / 1000)
    assert tail_recompute.recompute(summary, per_question=False, ar_device=False) == []  # charged as now
    summary["code_at_end"] = {"commit": "c0ffee"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    asked: list[str] = []

    def charged(commit: str) -> tuple[bool, bool]:
        asked.append(commit)
        return charged_as.pop(0)

    monkeypatch.setattr(tail_recompute, "charged_tails", charged)
    charged_as = [(True, True), (False, False)]
    assert tail_recompute.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fixed-4 | 200.0 | 89.3 | 9 |" in out and "gelato ē" not in out
    assert tail_recompute.main([str(tmp_path)]) == 0  # a run charged as now: left as recorded
    assert "nothing to recompute" in capsys.readouterr().out and asked == ["c0ffee", "c0ffee"]


def test_which_tails_a_commit_charged_comes_from_the_history(tmp_path: Path) -> None:
    """A run recorded with code that already charges tails as now must not lose tails it never
    had (an LTE ar-edge at 5.2 mJ/token came out at -137): the recorded commit is placed against
    the two fixes in git's history, here a repository of four commits standing in for them."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    commits = []
    for name in ("old", "ar_fix", "between", "tail_fix", "new"):
        git(
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            name,
        )
        commits.append(git("rev-parse", "HEAD").strip())
    old, ar_fix, between, tail_fix, new = commits
    fixes = (tail_fix, ar_fix)
    assert tail_recompute.charged_tails(old, tmp_path, fixes) == (True, True)
    assert tail_recompute.charged_tails(between, tmp_path, fixes) == (True, False)
    assert tail_recompute.charged_tails(new, tmp_path, fixes) == (False, False)
    with pytest.raises(ValueError, match="cannot tell"):
        tail_recompute.charged_tails("0" * 40, tmp_path, fixes)
