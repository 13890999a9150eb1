"""The targets `gelato-bench` judges a run by (gelato.benchmarks.bench_report): speedups against the best
fixed K, the oracle and fixed-0, the lines that report them saying no more than was shown, and whether
budgeted runs (and their worst device) kept their energy budget."""

from __future__ import annotations

from typing import Any

import pytest

from gelato.benchmarks.bench_report import target_lines, targets


def row(label: str, family: str, tps: float, jpt: float, pipeline: bool | str = False) -> dict[str, Any]:
    return {
        "label": label,
        "policy": label.split()[0],
        "family": family,
        "tokens_per_s": tps,
        "energy_j_per_token": jpt,
        "pipeline": pipeline,
    }


def test_targets() -> None:
    rows = [
        row("fixed-0", "fixed", 10, 0.02),
        row("fixed-2", "fixed", 30, 0.012),
        row("fixed-4", "fixed", 40, 0.010),
        row("gelato", "gelato", 50, 0.009),
        row("gelato+pipe", "gelato", 55, 0.0095, True),  # an older summary: pipeline a bool
        row("gelato+send-ahead", "gelato", 64, 0.0099, "send-ahead"),
        row("heuristic", "heuristic", 9, 0.02),
    ]
    t = targets(rows, [{"label": "oracle K≤8", "k_cap": 8, "tokens_per_s": 60.0}], 8)
    g, gp, sa = t["gelato"]
    assert g["best_fixed"] == "fixed-4" and g["speedup_vs_best_fixed"] == pytest.approx(1.25) and g["met"]
    assert not gp["met"] and gp["goal"] == 1.5  # 1.375x: short of the pipelined goal
    assert gp["speedup_vs_unpipelined"] == pytest.approx(1.1) and not gp["unpipelined_met"]
    assert sa["met"] and sa["goal"] == 1.5 and sa["unpipelined_met"] and sa["pipeline"] == "send-ahead"
    assert "unpipelined_met" not in g
    assert g["oracle_met"] is False and g["vs_oracle"] == pytest.approx(50 / 60)
    assert t["beats_fixed0"] == {
        "fixed-2": True,
        "fixed-4": True,
        "gelato": True,
        "gelato+pipe": True,
        "gelato+send-ahead": True,
        "heuristic": False,
    }
    slow_t = targets([*rows[:3], row("gelato", "gelato", 50, 0.011)], [], 8)
    slow = slow_t["gelato"][0]
    assert not slow["met"] and slow["energy_ratio_vs_best_fixed"] > 1  # faster, but at more J/token
    # No oracle row (--no-oracle): not measured, never "falls short" (it printed "-× None ... FALLS SHORT").
    assert slow["oracle_met"] is None and slow["vs_oracle"] is None
    assert "the oracle: not measured (no oracle row)" in target_lines(slow_t)[0]
    assert (
        "the oracle: not measured" not in target_lines(t)[0] and "(goal ≥ 0.9×): **FALLS SHORT**" in target_lines(t)[0]
    )
    assert "- every speculative run faster than fixed-0: **FALLS SHORT** (heuristic)" in target_lines(t)
    without_f0 = targets(rows[1:], [], 8)  # no fixed-0 run: the check is not made, never "MET"
    assert without_f0["beats_fixed0"] == {}
    assert "- every speculative run faster than fixed-0: not measured (no fixed-0 run)" in target_lines(without_f0)


def test_target_lines_say_no_more_than_was_shown() -> None:
    """A pipelined run is not judged by the oracle (its rounds go one at a time); a ratio just short
    of its goal is not printed as the goal; a run that a fixed K beats at no more J/token says so,
    however it compares with the slower, dearer fixed Ks; with none spending as much, one clause."""
    from gelato.benchmarks.bench_report import ratio_text

    rows = [
        row("fixed-4", "fixed", 40, 0.010),
        row("fixed-8", "fixed", 30, 0.013),
        row("gelato", "gelato", 35, 0.011),
        row("gelato+send-ahead", "gelato", 70, 0.020, "send-ahead"),
    ]
    t = targets(rows, [{"label": "oracle K≤8", "k_cap": 8, "tokens_per_s": 60.0}], 8)
    g, sa = t["gelato"]
    assert sa["oracle_met"] is None and sa["vs_oracle"] == pytest.approx(70 / 60)  # above the "bound"
    lines = target_lines(t)
    assert "1.17× oracle K≤8 (not a bound for a pipelined run" in lines[1] and "MET" not in lines[1].split(";")[2]
    assert g["dominated_by"] == "fixed-4" and sa["dominated_by"] is None
    assert "1.17× fixed-8 (the fastest fixed-K spending at least as much), but fixed-4 is faster" in lines[0]
    assert "Pareto view: no fixed-K spends as much per token;" in lines[1]
    assert "(no fixed-K spends as much) (the fastest" not in "".join(lines)
    assert ratio_text(1.1958, 1.2) == "1.196" and ratio_text(0.8973, 0.9) == "0.897"
    assert ratio_text(1.2, 1.2) == "1.20" and ratio_text(1.31, 1.2) == "1.31" and ratio_text(None, 1.0) == "-"
    assert ratio_text(1.0015, 1.0, at_most=True) == "1.002" and ratio_text(0.9984, 1.0, at_most=True) == "1.00"
    assert ratio_text(1.0, 1.0, at_most=True) == "1.00" and ratio_text(1.0401, 1.0, at_most=True) == "1.04"


def test_budgeted_runs_say_whether_they_kept_their_budget() -> None:
    """Each run with an energy budget: its J/token and its worst device's against ē (within 5 %:
    kept), computed from the questions' own energy; unbudgeted runs get no line."""
    from gelato.benchmarks.bench_report import budget_lines

    def budgeted(label: str, jpt: float, per_device_j: list[tuple[int, float, int]]) -> dict[str, Any]:
        r = row(label, "gelato", 40, jpt)
        r["budget_j_per_token"], r["q_max_j"] = 0.010, 0.5
        r["per_question"] = [{"device": d, "energy_j": j, "n_tokens": n} for d, j, n in per_device_j]
        return r

    kept = budgeted("gelato ē=10.0mJ", 0.0100, [(0, 0.49, 50), (1, 0.51, 50)])
    skewed = budgeted("gelato ē=10.0mJ b", 0.0100, [(0, 0.45, 50), (1, 0.30, 25), (0, 0.10, 25)])
    over = budgeted("lyapunov ē=10.0mJ", 0.0107, [(0, 1.07, 100), (1, None, 0)])  # type: ignore[list-item]
    t = targets([row("fixed-2", "fixed", 30, 0.012), row("gelato", "gelato", 50, 0.011), kept, skewed, over], [], 8)
    by = {b["label"]: b for b in t["budgets"]}
    assert set(by) == {kept["label"], skewed["label"], over["label"]}  # the unbudgeted gelato: none
    assert by[kept["label"]]["kept"] and by[kept["label"]]["worst_device"] == 1
    assert by[kept["label"]]["worst_device_ratio"] == pytest.approx(1.02)
    # The run is on budget, one device is 1.2× over: not kept.
    assert not by[skewed["label"]]["kept"] and by[skewed["label"]]["worst_device_ratio"] == pytest.approx(1.2)
    assert not by[over["label"]]["kept"] and by[over["label"]]["ratio"] == pytest.approx(1.07)
    lines = [x for x in target_lines(t) if "its budget ē" in x]
    assert len(lines) == 3 and lines[0].endswith("**KEPT**") and lines[2].endswith("**OVER BUDGET**")
    # Device 1 reported no energy: one device is left, whose J/token is the run's (no second clause).
    assert "10.70 mJ/token = 1.07× its budget ē = 10.00 mJ/token; peak Q 0.50 J" in lines[2]
    assert "its worst device (device 1) 1.20× ē" in lines[1]
    alone = budgeted("gelato ē=10.0mJ c", 0.0102, [(0, 1.02, 100)])
    (solo,) = targets([alone], [], 8)["budgets"]
    assert solo["kept"] and solo["worst_device"] is None and "worst device" not in budget_lines([solo])[0]
    # The fixed-K runs' own device spread, for scale: no budget there, yet a device over its run.
    fixed = [row("fixed-2", "fixed", 30, 0.012), row("fixed-4", "fixed", 35, 0.011)]
    for r, (j0, j1, n) in zip(fixed, ((0.55, 0.65, 50), (0.99, 1.21, 100)), strict=True):
        r["per_question"] = [{"device": 0, "energy_j": j0, "n_tokens": n}, {"device": 1, "energy_j": j1, "n_tokens": n}]
    scaled = targets([*fixed, kept], [], 8)
    assert scaled["fixed_device_spread"]["min"] == pytest.approx(0.013 / 0.012)
    assert scaled["fixed_device_spread"]["max"] == pytest.approx(0.0121 / 0.011)
    note = "for scale, the fixed-K runs (no budget to keep): their worst device at 1.08–1.10×"
    assert any(note in x for x in target_lines(scaled))
    assert targets([*fixed, row("gelato", "gelato", 50, 0.011)], [], 8)["fixed_device_spread"] is None  # no budget


def test_a_budgeted_run_without_an_energy_reading_says_not_measured() -> None:
    """A budgeted run with no J/token was left out of the budget lines (neither KEPT nor OVER, no
    line at all) and its Pareto view said "no fixed-K spends as much"; a device with a question
    of unknown energy got a J/token over its other questions only (low)."""
    from gelato.benchmarks.bench_report import device_j_per_token

    blind = row("gelato ē=10.0mJ", "gelato", 40, None)  # type: ignore[arg-type]
    blind["budget_j_per_token"] = 0.010
    t = targets([row("fixed-2", "fixed", 30, 0.012), blind], [], 8)
    assert [b["kept"] for b in t["budgets"]] == [None]
    lines = target_lines(t)
    assert "- gelato ē=10.0mJ: its budget ē = 10.00 mJ/token: not measured (no energy reading)" in lines
    assert any("Pareto view: not measured (no energy reading)" in x for x in lines)
    assert not any("no fixed-K spends as much" in x for x in lines)
    partly = {
        "per_question": [
            {"device": 0, "energy_j": 0.5, "n_tokens": 50},
            {"device": 0, "energy_j": None, "n_tokens": 50},
        ]
    }
    partly["per_question"].append({"device": 1, "energy_j": 0.6, "n_tokens": 50})
    assert device_j_per_token(partly) == {1: pytest.approx(0.012)}
