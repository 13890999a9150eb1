"""PNG plots of `gelato-bench gsm8k` (matplotlib, Agg backend set by the caller).

Contract: each function takes the run's result dict (`summary.json`'s content), the per-round rows
by run label, and a path; it writes the PNG and returns True, or False when the run has nothing to
plot (e.g. no budgeted controller run for Q(t)).
- `pareto`: tokens/s vs device mJ/token of every speculative run and the oracle, drawn by
  `gelato.benchmarks.simulate_sweep.plot_pareto` (fixed-K line, markers per policy, the controllers'
  budget sweep as dashed lines, a pipelined mode's sweep a line of its own, budgets as vertical
  lines; a sweep joins every budgeted run of its policy and mode, so with several `--v` values it
  joins points of different V: read those from the table); ar-edge and ar-device are off its scale.
  Pipelined runs without a budget are markers of their own, `gelato+local`, `gelato+send-ahead`.
  Its energy axis names the plotted rows' energy sources (`energy_source_text`: estimated or
  measured, and by which meter), as the q_trace's Q axis does for its runs.
- `q_trace`: gelato's deficit queue Q after each round vs the device's cumulative round time
  (device 0), per budget and V.
- `draft_hist`: share of rounds per drafted length k, per adaptive run without a budget.
- `calibration`: observed acceptance per drafter-entropy bin (every speculative run; drafts after a
  block's first rejection are unobserved and excluded), and the controller's p̂(accept) against the
  observed rate (gelato runs): a reliability diagram.
- `devices` (N > 1): the fleet's tokens/s per run (bars; Σ of each device's own rate as a marker)
  and each device's p50/p99 latency per token.
`plots_unavailable(no_plots)` says why no plot can be drawn here (no matplotlib), before a run.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from gelato.benchmarks.bench_run import pipeline_mode

Rounds = dict[str, list[dict[str, Any]]]


def plots_unavailable(no_plots: bool) -> str:
    """Why plots cannot be drawn here (matplotlib is the dev extra's, not the runtime's), or "":
    a benchmark asks at its start, not after a long run."""
    if no_plots or importlib.util.find_spec("matplotlib") is not None:
        return ""
    return "plots need matplotlib (pip install 'matplotlib>=3.8', or the project's dev extra); or pass --no-plots"


ADAPTIVE = ("heuristic", "entropy", "adaedl", "lyapunov", "gelato")


# A run's energy entry is "SOURCE (KIND)" (e.g. "cpu-model (estimated)"); an oracle row's is
# "simulated from KIND (SOURCE) + ... costs".
_RUN_ENERGY = re.compile(r"^(\S+) \((estimated|measured)\)$")
_ORACLE_ENERGY = re.compile(r"(estimated|measured) \(([^)]+)\)")


def energy_source_text(rows: list[dict[str, Any]]) -> str:
    """Where the rows' device energy came from, for an axis label: the kinds (estimated, measured)
    and the meters of their `energy` entries, e.g. "estimated: cpu-model"; "source not recorded"
    when no row names one."""
    found: set[tuple[str, str]] = set()
    for entry in (e for r in rows for e in r.get("energy") or []):
        m = _RUN_ENERGY.match(entry)
        found |= {(m.group(2), m.group(1))} if m else {(k, s) for k, s in _ORACLE_ENERGY.findall(entry)}
    if not found:
        return "source not recorded"
    kinds = [k for k in ("estimated", "measured") if any(kind == k for kind, _ in found)]
    meters = sorted({s for _, s in found})
    return f"{' + '.join(kinds)}: {', '.join(meters)}"


def _pareto_row(r: dict[str, Any]) -> dict[str, Any]:
    mode = pipeline_mode(r.get("pipeline"))
    policy = r["policy"] + ("" if mode == "off" else f"+{mode}")
    return {**r, "policy": policy, "j_per_token": r["energy_j_per_token"]}


def pareto(result: dict[str, Any], rounds: Rounds, path: Path) -> bool:
    from gelato.benchmarks.simulate_sweep import plot_pareto

    # ar-edge (streamed) and ar-device sit far off the speculative runs' scale: they are in the table.
    rows = [
        r
        for r in result["runs"] + result["references"]
        if r.get("energy_j_per_token") and r.get("tokens_per_s") and r["policy"] not in ("ar-edge", "ar-device")
    ]
    budget = [r for r in rows if r.get("budget_j_per_token") is not None]
    base = [_pareto_row(r) for r in rows if r not in budget]
    # A pipelined run's sweep is its own line (policy `gelato+send-ahead`), not mixed into the other's.
    sweep = sorted((_pareto_row(r) for r in budget), key=lambda r: r["j_per_token"])
    if not base:
        return False
    plot_pareto({"baselines": base, "budget_sweep": sweep}, path, energy_source_text(rows))
    return True


def q_trace(result: dict[str, Any], rounds: Rounds, path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["family"] == "gelato" and r.get("budget_j_per_token")]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in runs:
        t, xs, ys = 0.0, [], []
        for row in (x for x in rounds.get(r["label"], []) if x["device"] == 0):
            t += row["t_round_s"]
            xs.append(t)
            ys.append(row.get("q_deficit_j") or 0.0)
        ax.plot(xs, ys, lw=0.8, label=r["label"])
    ax.set_xlabel("device 0: cumulative round time (s)")
    ax.set_ylabel(f"Q (J; device energy {energy_source_text(runs)})")
    ax.set_title("gelato: energy-deficit queue Q(t) per budget ē and V")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def draft_hist(result: dict[str, Any], rounds: Rounds, path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["family"] in ADAPTIVE and r.get("budget_j_per_token") is None]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    kmax = max(max((x["k"] for x in rounds.get(r["label"], [])), default=0) for r in runs)
    bins = [k - 0.5 for k in range(kmax + 2)]
    for r in runs:
        ks = [x["k"] for x in rounds.get(r["label"], [])]
        if ks:
            ax.hist(ks, bins=bins, histtype="step", lw=1.2, density=True, label=r["label"])
    ax.set_xlabel("drafted tokens per round (k)")
    ax.set_ylabel("share of rounds")
    ax.set_title("Draft-length distribution")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def observed(rows: list[dict[str, Any]]) -> list[tuple[float, float | None, int]]:
    """(entropy, p̂ or None, accepted 0/1) per observed draft: up to and including the first rejection."""
    out = []
    for r in rows:
        ents, ps = r.get("entropies") or [], r.get("p_accept") or []
        for j in range(min(r["k"], r["accepted"] + 1, len(ents))):
            out.append((ents[j], ps[j] if j < len(ps) else None, int(j < r["accepted"])))
    return out


def _bins(points: list[tuple[float, int]], n: int = 10) -> tuple[list[float], list[float], list[int]]:
    """Equal-count bins: mean x, acceptance rate, count."""
    pts = sorted(points)
    size = max(1, len(pts) // n)
    xs, ys, ns = [], [], []
    for i in range(0, len(pts), size):
        chunk = pts[i : i + size]
        xs.append(sum(p[0] for p in chunk) / len(chunk))
        ys.append(sum(p[1] for p in chunk) / len(chunk))
        ns.append(len(chunk))
    return xs, ys, ns


def calibration(result: dict[str, Any], rounds: Rounds, path: Path) -> bool:
    import matplotlib.pyplot as plt

    spec = [r["label"] for r in result["runs"] if r["family"] != "reference" and r["policy"] != "fixed-0"]
    obs = [o for label in spec for o in observed(rounds.get(label, []))]
    if not obs:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    xs, ys, _ = _bins([(h, a) for h, _, a in obs], 12)
    a1.plot(xs, ys, "o-")
    a1.set_xlabel("drafter entropy H (nats), equal-count bins")
    a1.set_ylabel("observed acceptance")
    a1.set_title(f"Acceptance vs entropy ({len(obs)} observed drafts)")
    a1.grid(alpha=0.3)
    gel = [o for r in result["runs"] if r["family"] == "gelato" for o in observed(rounds.get(r["label"], []))]
    pred = [(p, a) for _, p, a in gel if p is not None]
    if pred:
        px, py, _ = _bins(pred, 10)
        a2.plot(px, py, "o-", label="gelato runs")
    a2.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    a2.set_xlabel("calibrated p̂(accept | H)")
    a2.set_ylabel("observed acceptance")
    a2.set_title("Calibrator reliability")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def devices(result: dict[str, Any], rounds: Rounds, path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r.get("per_device")]
    if not runs:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [r["label"] for r in runs]
    # The fleet rate (every token over the span the devices ran) is what the edge delivered; the
    # sum of each device's own rate is higher where devices finished at different times.
    fleet = [r.get("fleet_tokens_per_s") or 0.0 for r in runs]
    a1.bar(range(len(runs)), fleet, color="tab:blue", label="fleet: all tokens ÷ the devices' span")
    summed = [r["aggregate_tokens_per_s"] for r in runs]
    a1.scatter(range(len(runs)), summed, marker="D", color="black", s=14, label="Σ each device's own rate", zorder=3)
    a1.set_ylabel("tokens/s")
    a1.legend(fontsize=8)
    for i, r in enumerate(runs):
        p50 = [d["latency_p50_ms"] for d in r["per_device"] if d["latency_p50_ms"] is not None]
        p99 = [d["latency_p99_ms"] for d in r["per_device"] if d["latency_p99_ms"] is not None]
        a2.scatter([i] * len(p50), p50, marker="o", color="tab:green", s=12, label="p50" if i == 0 else None)
        a2.scatter([i] * len(p99), p99, marker="^", color="tab:red", s=12, label="p99" if i == 0 else None)
    a2.set_ylabel("per-device latency per token (ms)")
    a2.set_yscale("log")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.set_xticks(range(len(runs)), labels, rotation=70, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result['settings']['devices']} devices: fleet throughput and per-device latency per token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
