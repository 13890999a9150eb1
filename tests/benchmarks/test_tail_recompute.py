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


def test_each_device_keeps_one_tail_and_ar_device_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert tail_recompute.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fixed-4 | 200.0 | 89.3 | 9 |" in out and "gelato ē" not in out
