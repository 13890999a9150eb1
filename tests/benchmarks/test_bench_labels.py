"""Labels of `gelato-bench gsm8k`'s results: the oracle rows' energy source follows the fixed-K runs'
meter (every device run meters with cpu-model: an estimate), and the N-device latency column says it
is the worst device's p50 and p99."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gelato.benchmarks.bench_run import RunResult, RunSpec

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def run(policy: str, family: str, kind: str, source: str) -> RunResult:
    meter = {"energy_kind": kind, "energy_source": source}
    rec = {"question": 0, "device": 0, "token_ids": [1, 2], "n_tokens": 2, **meter}
    return RunResult(RunSpec(policy, policy, family), [rec], [{"k": 2, "accepted": 1, **meter}])


def test_oracle_energy_label_follows_the_fixed_k_meter() -> None:
    from gelato.benchmarks.bench_finish import oracle_energy_label

    est = [run("fixed-2", "fixed", "estimated", "cpu-model"), run("fixed-4", "fixed", "estimated", "cpu-model")]
    assert oracle_energy_label(est) == "simulated from estimated (cpu-model) costs"
    assert oracle_energy_label([run("fixed-2", "fixed", "measured", "nvml")]) == "simulated from measured (nvml) costs"
    mixed = oracle_energy_label([est[0], run("fixed-4", "fixed", "measured", "rapl")])
    assert mixed == "simulated from estimated (cpu-model) + measured (rapl) costs"
    unrecorded = RunResult(RunSpec("fixed-2", "fixed-2", "fixed"), [{"question": 0}], [{"k": 2}])
    assert "measured" not in oracle_energy_label([unrecorded])


def _references_args() -> argparse.Namespace:
    """What `bench_finish.references` reads of a run's arguments (as `main` resolves them)."""
    return argparse.Namespace(
        no_assisted=True,
        no_oracle=False,
        target=None,
        drafter=None,
        k_max=8,
        radio="wifi",
        max_new_tokens=2,
        radio_rates_mbit=(0.0, 0.0),
    )


def test_oracle_rows_of_a_cpu_model_run_are_labelled_estimated(monkeypatch: pytest.MonkeyPatch) -> None:
    """`references` itself, with the models and the oracle replay stubbed out."""
    import gelato.models
    from gelato.benchmarks import bench_finish, bench_refs

    model = SimpleNamespace(tokenizer=None, context_limit=64)
    monkeypatch.setattr(gelato.models, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(gelato.models, "encode_prompt", lambda tok, q: [0])
    monkeypatch.setattr(bench_refs, "oracle_traces", lambda *a: [])
    oracle_row = {"label": "oracle K≤8", "policy": "oracle", "k_cap": 8, "tokens_per_s": 1.0}
    monkeypatch.setattr(bench_refs, "oracle", lambda *a: {"rows": [oracle_row]})
    args = _references_args()
    results = [run("ar-edge", "ar", "estimated", "cpu-model"), run("fixed-2", "fixed", "estimated", "cpu-model")]
    rows, _ = bench_finish.references(args, None, results, [{"question": "q", "gold": 1.0}])
    assert [r["energy"] for r in rows] == [["simulated from estimated (cpu-model) costs"]]


def test_no_oracle_is_made_from_fixed_0_alone(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`--policies ar-edge,fixed-0,gelato`: fitted to rounds that draft nothing, the oracle's drafting
    cost was 0 s/token (it drafted for free) and gelato was judged against that "bound"."""
    import gelato.models
    from gelato.benchmarks import bench_finish, bench_refs

    model = SimpleNamespace(tokenizer=None, context_limit=64)
    monkeypatch.setattr(gelato.models, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(gelato.models, "encode_prompt", lambda tok, q: [0])

    def no_oracle(*a: object) -> None:
        raise AssertionError("an oracle made from fixed-0 alone")

    monkeypatch.setattr(bench_refs, "oracle", no_oracle)
    args = _references_args()
    fixed0 = RunResult(RunSpec("fixed-0", "fixed-0", "fixed"), [{"question": 0}], [{"k": 0, "accepted": 0}])
    results = [run("ar-edge", "ar", "estimated", "cpu-model"), fixed0]
    rows, detail = bench_finish.references(args, None, results, [{"question": "q", "gold": 1.0}])
    assert rows == [] and detail == {} and "oracle bound: not made" in capsys.readouterr().out
    with pytest.raises(bench_refs.NoDraftingCosts, match="K >= 1"):
        bench_refs.fit_model([fixed0], "wifi", 64, 8)


def per_device(*lat: tuple[float | None, float | None]) -> list[dict[str, Any]]:
    return [{"device": i, "latency_p50_ms": p50, "latency_p99_ms": p99} for i, (p50, p99) in enumerate(lat)]


def test_latency_column_is_labelled_worst_device() -> None:
    from gelato.benchmarks.bench_report import table, worst_device_latency

    r = {"label": "gelato", "per_device": per_device((5.0, 40.0), (7.0, 30.0)), "aggregate_tokens_per_s": 90.0}
    assert worst_device_latency(r) == (7.0, 40.0)  # each the highest device's own percentile
    assert worst_device_latency({"per_device": per_device((None, None))}) == (None, None)  # never a made-up 0
    lines = table([r, {**r, "label": "gelato 2", "fleet_tokens_per_s": 80.0}, {"label": "oracle K≤8"}], devices=2)
    assert "| Σ device tokens/s | fleet tokens/s | worst device p50 / p99 ms/token |" in lines[0]
    assert "| gelato | - | 90.0 | - | 7.0 / 40.0 |" in lines[2]  # no question times recorded: no fleet rate
    assert "| gelato 2 | - | 90.0 | 80.0 | 7.0 / 40.0 |" in lines[3]
    assert "| oracle K≤8 | - | - | - | - / - |" in lines[4]
    assert "p50 / p99" not in table([r], devices=1)[0]


def test_markdown_notes_say_what_the_latency_and_oracle_columns_are() -> None:
    from gelato.benchmarks.bench_report import markdown

    n8 = markdown(json.loads((RESULTS / "gsm8k_wifi_n8" / "summary.json").read_text()))
    assert "worst device p50 / p99 ms/token |" in n8
    assert "worst device p50 / p99: the highest of the devices' own p50" in n8
    n1 = markdown(json.loads((RESULTS / "gsm8k_wifi_n1" / "summary.json").read_text()))
    assert "worst device" not in n1  # one device: no latency column, no note
    for md in (n1, n8):
        assert "verdicts and measured costs" not in md  # the oracle's energy is only as measured as the meter's


def test_runs_under_one_label_get_their_own() -> None:
    """Two runs whose labels format alike (ē of 8.383 and 8.384 mJ, a τ listed twice) would write
    one trace/rounds file and be merged on rebuild: the later ones get `(n)`."""
    from gelato.benchmarks.procs import unique_label

    seen: dict[str, int] = {}
    labels = [unique_label(x, seen) for x in ("gelato ē=8.38mJ", "gelato ē=8.38mJ", "fixed-4", "gelato ē=8.38mJ")]
    assert labels == ["gelato ē=8.38mJ", "gelato ē=8.38mJ (2)", "fixed-4", "gelato ē=8.38mJ (3)"]


def test_grpc_line_says_what_the_difference_is() -> None:
    """The measured gRPC figure is an Info round trip through the channel minus the same call made
    directly to the edge, not an overhead on top of the echo RTT: the table says which."""
    from gelato.benchmarks.bench_report import markdown

    md = " ".join(markdown(json.loads((RESULTS / "gsm8k_wifi_n1" / "summary.json").read_text())).split())
    assert "gRPC adds" not in md
    assert "a gRPC Info round trip takes" in md and "ms more through the channel than direct to the edge" in md


def test_energy_axes_name_their_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every energy axis says whether its energy is estimated or measured: the bench's Pareto and Q(t)
    plots from the plotted runs' recorded sources, the simulator's as estimated (simulated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gelato.benchmarks import bench_plots, simulate_sweep

    rows = [{"energy": ["cpu-model (estimated)"]}, {"energy": ["simulated from estimated (cpu-model) costs"]}]
    assert bench_plots.energy_source_text(rows) == "estimated: cpu-model"
    mixed = [{"energy": ["cpu-model (estimated)"]}, {"energy": ["rapl (measured)"]}]
    assert bench_plots.energy_source_text(mixed) == "estimated + measured: cpu-model, rapl"
    assert bench_plots.energy_source_text([{"energy": ["n/a: device and edge in one process"]}]) == (
        "source not recorded"
    )
    figs: list[Any] = []
    monkeypatch.setattr(plt, "close", figs.append)
    result = json.loads((RESULTS / "gsm8k_wifi_n1" / "summary.json").read_text())
    assert bench_plots.pareto(result, {}, tmp_path / "p.png")
    assert figs[-1].axes[0].get_xlabel() == "device energy, estimated: cpu-model (mJ/token)"
    base = [{"policy": "fixed-2", "j_per_token": 0.01, "tokens_per_s": 5.0, "label": "fixed-2"}]
    simulate_sweep.plot_pareto({"baselines": base, "budget_sweep": []}, tmp_path / "s.png")
    assert figs[-1].axes[0].get_xlabel() == "device energy, estimated, simulated (mJ/token)"
    monkeypatch.undo()
    for fig in figs:
        plt.close(fig)


def test_pareto_draws_each_pipelined_budget_sweep_as_its_own_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Budgeted send-ahead runs are on the plot, as their own ē sweep, not dropped or mixed into
    the unpipelined sweep of the same policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gelato.benchmarks import bench_plots

    figs: list[Any] = []
    monkeypatch.setattr(plt, "close", figs.append)
    result = json.loads((RESULTS / "gsm8k_wifi_n1" / "summary.json").read_text())
    assert bench_plots.pareto(result, {}, tmp_path / "p.png")
    monkeypatch.undo()
    lines = {ln.get_label(): ln for ln in figs[-1].axes[0].get_lines()}
    plt.close(figs[-1])
    budgeted = [r for r in result["runs"] if r.get("budget_j_per_token") is not None]
    for policy, mode in (("gelato", "off"), ("gelato", "send-ahead"), ("lyapunov", "off")):
        rs = [r for r in budgeted if r["policy"] == policy and r["pipeline"] == mode]
        name = policy if mode == "off" else f"{policy}+{mode}"
        xs = list(lines[f"{name}, ē sweep"].get_xdata())
        assert len(rs) == 2 and xs == sorted(r["energy_j_per_token"] * 1e3 for r in rs)


def test_energy_note_names_the_radio_model_only_when_there_is_one() -> None:
    from gelato.benchmarks.bench import energy_note

    assert "`lte` radio model from bytes" in energy_note("phone", "lte") and "ESTIMATE" in energy_note("phone", "lte")
    none = energy_note("phone", "none")
    assert "no radio model" in none and "Huang" not in none and "`none`" not in none
