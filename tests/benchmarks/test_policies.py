"""`gelato.benchmarks.policies`: the energy note of its results names the device profile and radio
model the device processes were actually given, not a fixed `phone` + `wifi`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


def test_energy_note_follows_device_profile_and_radio() -> None:
    from gelato.benchmarks.policies import Bench, RunSpec, build_parser, energy_note

    args = build_parser().parse_args(["--device-profile", "laptop", "--radio", "lte", "--data", "q.jsonl"])
    note = energy_note(args.device_profile, args.radio)
    assert note == "device energy: cpu-model (estimated) laptop profile + lte radio model, not a measurement"
    # The note and the devices' flags come from the same arguments.
    bench = object.__new__(Bench)  # no edge, no proxy: only the command line is built
    bench.args, bench.device_prefix, bench.proxy = args, [], SimpleNamespace(address="127.0.0.1:1")
    cmd = bench.device_cmd(RunSpec("fixed-2", "fixed-2", "fixed"), Path("t.jsonl"))
    assert cmd[cmd.index("--meter") + 1] == "cpu-model"
    assert cmd[cmd.index("--device-profile") + 1] == "laptop" and cmd[cmd.index("--radio") + 1] == "lte"
    # The defaults give the note the committed results carry.
    d = build_parser().parse_args([])
    assert energy_note(d.device_profile, d.radio) == (
        "device energy: cpu-model (estimated) phone profile + wifi radio model, not a measurement"
    )
    assert energy_note("jetson-orin-nano", "none") == (
        "device energy: cpu-model (estimated) jetson-orin-nano profile + no radio model, not a measurement"
    )


def test_speed_probe_and_its_column() -> None:
    """The per-run machine-speed probe: drafter ms per drafted token, edge compute ms per verified
    row (drafts + the target's token), from the trace; None where nothing was drafted; shown in
    the run table."""
    from gelato.benchmarks.policies import speed_probe
    from gelato.benchmarks.policies_report import run_table

    rounds = [
        {"k": 4, "t_draft_s": 0.006, "t_edge_compute_s": 0.0055},
        {"k": 2, "t_draft_s": 0.003, "t_edge_compute_s": 0.004},
    ]
    probe = speed_probe(rounds)
    assert probe == {"draft_ms_per_token": pytest.approx(1.5), "edge_ms_per_row": pytest.approx(1.1875)}
    empty = speed_probe([{"k": 0, "t_draft_s": 0.0, "t_edge_compute_s": 0.003}])
    assert empty == {"draft_ms_per_token": None, "edge_ms_per_row": pytest.approx(3.0)}
    run = {"label": "fixed-4", "tokens_per_s": 10.0, "energy_j_per_token": 0.01, "long_run_j_per_token": None}
    run |= {"q_final_j": None, "acceptance": 0.5, "mean_draft_len": 3.0, "rounds": 2, "tokens_per_round": 3.0}
    header, rule, row = run_table([{**run, **probe}])
    assert header.count("|") == rule.count("|") == row.count("|")
    assert "| 1.50 · 1.19 |" in row


def _summary(spec: object, tokens_per_s: float, j_per_token: float) -> dict[str, object]:
    from dataclasses import asdict

    s = {**asdict(spec), "tokens_per_s": tokens_per_s, "energy_j_per_token": j_per_token}  # type: ignore[call-overload]
    s |= {"long_run_j_per_token": None, "q_final_j": None, "acceptance": 0.5, "mean_draft_len": 3.0, "rounds": 9}
    return s | {"tokens_per_round": 3.0, "process_wall_s": 1.0, "loadavg_1min_after": 0.5}


def test_repeats_interleave_and_are_judged_each_on_its_own_runs(tmp_path: Path) -> None:
    """`--repeats 3`: the fixed sweep and the controllers three times in a row, ē from the first
    sweep only, fixed-0 (the reference) once; a machine that runs 20 % slower in repeat 2 moves
    fixed-K and controller alike: against ē as set that repeat has no fixed-K within ē and gelato
    over it, against ē rescaled by the repeat's own fixed-K cost every ratio stays put."""
    from gelato.benchmarks.policies import Run, build_parser, comparisons, run_all
    from gelato.benchmarks.policies_report import markdown

    # Per repeat: speed factor; fixed-4 costs 10 mJ/token × slowness, the controllers 0.95 × that.
    slow = {1: 1.0, 2: 1.2, 3: 1.0}
    base = {"fixed-0": (40.0, 0.015), "fixed-4": (100.0, 0.010), "lyapunov": (102.0, 0.0095), "gelato": (110.0, 0.0095)}

    class FakeBench:
        def __init__(self) -> None:
            self.order: list[tuple[str, int]] = []

        def run(self, spec: object) -> Run:
            label, repeat = spec.label, spec.repeat  # type: ignore[attr-defined]
            self.order.append((label, repeat))
            tps, jpt = base[spec.policy]  # type: ignore[attr-defined]
            f = slow[repeat]
            return Run(spec, summary=_summary(spec, tps / f, jpt * f))  # type: ignore[arg-type]

    args = build_parser().parse_args(
        ["--policies", "fixed-4,lyapunov,gelato", "--budget-factors", "1.0", "--repeats", "3", "--out", str(tmp_path)]
    )
    bench = FakeBench()
    runs, budgets = run_all(bench, args)  # type: ignore[arg-type]
    assert budgets == [pytest.approx(0.010)]  # the first sweep's cheapest fixed-K
    b = "ē=0.01"
    assert bench.order == [
        ("fixed-0", 1), ("fixed-4", 1), ("lyapunov", 1), (f"lyapunov {b}", 1), ("gelato", 1), (f"gelato {b}", 1),
        ("fixed-4", 2), ("lyapunov", 2), (f"lyapunov {b}", 2), ("gelato", 2), (f"gelato {b}", 2),
        ("fixed-4", 3), ("lyapunov", 3), (f"lyapunov {b}", 3), ("gelato", 3), (f"gelato {b}", 3),
    ]  # fmt: skip
    comp = comparisons(runs, budgets, 3)
    # Repeat 2 ran slow: its fixed-4 (12 mJ/token) no longer fits ē, and gelato is over ē too.
    r2 = comp["per_repeat"][1]["per_budget"][0]
    assert r2["fastest_fixed_fitting"] is None and not r2["gelato"]["within_budget"]
    agg = comp["over_repeats"]
    g = agg["per_budget"][0]["gelato"]
    assert agg["per_budget"][0]["fixed_fits"] == 2 and g["within_budget"] == 2
    assert g["speedup_vs_fixed"] == [pytest.approx(1.1), None, pytest.approx(1.1)]  # in order; none fit in 2
    assert g["speedup_vs_fixed_median"] == pytest.approx(1.1)
    assert g["j_over_budget"] == [pytest.approx(0.95), pytest.approx(1.14), pytest.approx(0.95)]
    assert g["j_over_budget_median"] == pytest.approx(0.95)
    assert agg["no_budget"]["gelato_vs_lyapunov"]["per_repeat"] == [pytest.approx(110 / 102)] * 3
    assert agg["no_budget"]["gelato_vs_fixed"]["median"] == pytest.approx(1.1)
    # Rescaled by each repeat's cheapest fixed-K J/token over the first's (1.2 in repeat 2), the
    # drift is taken off: in every repeat fixed-4 fits and gelato is at 0.95 of the budget.
    assert comp["scales"] == [1.0, pytest.approx(1.2), 1.0]
    fair = comp["over_repeats_rescaled"]["per_budget"][0]
    assert fair["fixed_fits"] == 3 and fair["gelato"]["within_budget"] == 3
    assert fair["gelato"]["j_over_budget"] == [pytest.approx(0.95)] * 3
    assert fair["gelato"]["speedup_vs_fixed"] == [pytest.approx(1.1)] * 3
    # Labels in the table carry the repeat; the report has the medians and every repeat's targets.
    result = {
        "command": "x", "machine": "m", "pinning": "p", "energy_note": "e", "lossless_failures": [],
        "settings": {"one_way_ms": 10.0, "jitter_ms": 0.0, "n": 1, "max_new_tokens": 8, "k_max": 8},
        "rtt": {"before": {"measured_ms": 20.0, "nominal_ms": 20}, "after": {"measured_ms": 20.0}},
        "runs": [{**r.summary, "code": "c"} for r in runs], "comparisons": comp,
    }  # fmt: skip
    md = markdown(result)
    assert "| gelato ē=0.01 #2 |" in md and "## Over 3 repeats" in md and "## Targets, repeat 3" in md
    assert "| 0.01 | 2/3 | 1.100 [1.100, -, 1.100] | 0.950 [0.950, 1.140, 0.950] | 2/3 |" in md
    assert "| 0.01 | 3/3 | 1.100 [1.100, 1.100, 1.100] | 0.950 [0.950, 0.950, 0.950] | 3/3 |" in md
    assert "(1.000, 1.200, 1.000)" in md


def test_repeats_must_be_positive() -> None:
    from gelato.benchmarks.policies import main

    with pytest.raises(SystemExit) as e:
        main(["--repeats", "0", "--data", "missing.jsonl"])
    assert e.value.code == 2


def test_budget_comparisons_count_speed_only_within_the_budget() -> None:
    """Under a budget "gelato ≥ lyapunov" and "lyapunov ≥ fixed-K" need the controller within
    1.05 ē: a table once printed MET for gelato ≥ lyapunov with both over their budget."""
    from gelato.benchmarks.policies_report import compare_budgets

    def run(family: str, tps: float, jpt: float, budget: float | None) -> dict[str, object]:
        return {"label": family, "family": family, "tokens_per_s": tps, "energy_j_per_token": jpt, "budget": budget}

    b = 0.010
    fixed = run("fixed", 100.0, 0.010, None)

    def targets(gelato: tuple[float, float], lyapunov: tuple[float, float]) -> dict[str, object]:
        runs = [fixed, run("gelato", *gelato, b), run("lyapunov", *lyapunov, b)]
        return compare_budgets(runs, [b])["per_budget"][0]["targets"]

    over_both = targets((120.0, 0.012), (110.0, 0.012))  # both faster, both over 1.05 ē
    assert over_both["gelato_ge_lyapunov"] is False and over_both["lyapunov_ge_fixed"] is False
    kept = targets((120.0, 0.0104), (110.0, 0.0100))
    assert kept["gelato_ge_lyapunov"] is True and kept["lyapunov_ge_fixed"] is True
    slower_but_kept = targets((90.0, 0.0100), (110.0, 0.0120))  # lyapunov faster but over: gelato wins
    assert slower_but_kept["gelato_ge_lyapunov"] is True and slower_but_kept["lyapunov_ge_fixed"] is False


def test_the_code_hash_covers_the_controller_wherever_it_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash read device/, edge/ and gelato/ beside this module's parent folder: the checkout's
    layout. Installed, that folder is site-packages/gelato itself, and gelato/ under it (the shared
    code, the controller) was left out without a word."""
    import gelato.controller
    import gelato.device.policy
    import gelato.edge.batcher
    from gelato.benchmarks import policies

    monkeypatch.setattr(policies, "__file__", str(tmp_path / "site-packages" / "gelato" / "benchmarks" / "policies.py"))
    files = set(policies.code_files())
    for module in (gelato.controller, gelato.device.policy, gelato.edge.batcher):
        assert Path(module.__file__).resolve() in files, module.__name__  # type: ignore[arg-type]
    assert len(policies.code_hash()) == 12


def test_no_fixed_k_within_the_budget_is_not_measured_and_a_rescaled_budget_keeps_its_own() -> None:
    """With no fixed-K run within ē the 1.15× target was not measured (n/a, not FALLS SHORT); and
    ē rescaled by a repeat's cheapest fixed-K over the first's (a ×1.0 budget) still admits that
    repeat's cheapest fixed-K, though the product may round a hair below its J/token."""
    from gelato.benchmarks.policies_report import compare_budgets

    def run(family: str, tps: float, jpt: float, budget: float | None) -> dict[str, object]:
        return {"label": family, "family": family, "tokens_per_s": tps, "energy_j_per_token": jpt, "budget": budget}

    none_fit = compare_budgets([run("fixed", 100.0, 0.02, None), run("gelato", 140.0, 0.01, 0.01)], [0.01])
    assert none_fit["per_budget"][0]["targets"]["gelato_1.15x_within_budget"] is None
    c1, c2 = 0.007475271238929568, 0.007602173722348299  # the first repeat's and this repeat's cheapest
    assert c1 * (c2 / c1) < c2  # the rounding this guards against
    rows = [run("fixed", 120.0, c2, None), run("gelato", 140.0, c2, c1)]
    row = compare_budgets(rows, [c1], c2 / c1)["per_budget"][0]
    assert row["fastest_fixed_fitting"] is not None and row["targets"]["gelato_1.15x_within_budget"] is True
