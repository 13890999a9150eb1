"""The simulator's sweeps and their outputs (`python -m gelato.benchmarks.simulate` drives them).

Contract: `sweep(traces, model, cfg)` runs, on the same devices and prompt order for every policy:
1. baselines: fixed-K for `cfg.fixed_ks`, heuristic, entropy at `cfg.taus`, adaedl at
   `cfg.lambdas`, lyapunov and gelato without a budget, and the oracle;
2. a budget sweep: lyapunov and gelato at each budget ē (default: five budgets from the lowest
   J/token any fixed-K reaches up to what the unconstrained controllers spend, where budgets bind,
   plus the highest fixed-K J/token), V = `cfg.v`;
3. a V sweep at one binding budget (default: `binding_budget`), lyapunov and gelato.
It returns one JSON-ready dict. `write_outputs(result, out)` writes `simulate.json`, `table.md`,
`pareto.png` (tokens/s vs J/token), `v_sweep.png` (tokens/s and mean Q vs V) and `q_trace.png`
(gelato's Q(t) per V), their energy axes labelled estimated (simulated from estimated powers);
`markdown(result)` is the table the CLI prints.

The pipelining sweep (`python -m gelato.benchmarks.simulate --pipelining`) is `gelato.benchmarks.simulate_pipelining`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gelato.benchmarks.simulate_device import run_spec
from gelato.benchmarks.simulate_model import RoundModel, Spec, Trace

CONTROLLERS = ("lyapunov", "gelato")


@dataclass(frozen=True)
class SweepConfig:
    devices: int = 1
    tokens_per_device: int = 20000
    seed: int = 0
    fixed_ks: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
    taus: tuple[float, ...] = (0.5, 1.0, 2.0)
    lambdas: tuple[float, ...] = (0.4, 0.6, 0.8)
    budgets: tuple[float, ...] = ()  # J/token; () = the default grid
    v: float = 20.0
    vs: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
    v_budget: float | None = None  # J/token; None = `binding_budget`
    q_every_s: float = 0.5  # Q(t) sampling of the V sweep's first device (simulated seconds)


def baseline_specs(cfg: SweepConfig) -> list[Spec]:
    specs = [Spec(f"fixed-{k}") for k in cfg.fixed_ks] + [Spec("heuristic")]
    specs += [Spec("entropy", tau=t) for t in cfg.taus] + [Spec("adaedl", lam=lam) for lam in cfg.lambdas]
    return [*specs, *(Spec(p) for p in CONTROLLERS), Spec("oracle")]


def default_budgets(e_min: float, e_max: float, e_free: float) -> list[float]:
    """Five budgets from e_min to what the unconstrained controllers spend (the binding range),
    and e_max (where nothing binds)."""
    top = min(max(e_free, e_min), e_max)
    grid = [e_min + (top - e_min) * i / 4 for i in range(5)] + [e_max]
    return sorted(set(grid))  # exact: the lowest budget is exactly the best fixed-K's J/token


def binding_budget(e_min: float, free: list[dict[str, Any]], budgets: list[float]) -> float:
    """A feasible budget that binds for every controller: a quarter of the way from e_min to the
    least any of them spends unconstrained. When one spends less than e_min unconstrained (entropy
    can make it more frugal than any fixed K), no feasible budget binds for it: the second budget."""
    lowest = min(r["j_per_token"] for r in free)
    return e_min + 0.25 * (lowest - e_min) if lowest > e_min else budgets[min(1, len(budgets) - 1)]


def sweep(traces: list[Trace], model: RoundModel, cfg: SweepConfig) -> dict[str, Any]:
    def run(spec: Spec, q_every_s: float = 0.0) -> dict[str, Any]:
        return run_spec(spec, traces, model, cfg.devices, cfg.tokens_per_device, cfg.seed, q_every_s)

    base = [run(s) for s in baseline_specs(cfg)]
    fixed = [r for r in base if r["policy"].startswith("fixed-")]
    e_min, e_max = min(r["j_per_token"] for r in fixed), max(r["j_per_token"] for r in fixed)
    e_free = max(r["j_per_token"] for r in base if r["policy"] in CONTROLLERS)
    budgets = list(cfg.budgets) or default_budgets(e_min, e_max, e_free)
    budget_rows = [run(Spec(p, budget=b, v=cfg.v)) for b in budgets for p in CONTROLLERS]
    v_budget = cfg.v_budget or binding_budget(e_min, [r for r in base if r["policy"] in CONTROLLERS], budgets)
    v_rows = [run(Spec(p, budget=v_budget, v=v), cfg.q_every_s) for v in cfg.vs for p in CONTROLLERS]
    for row in budget_rows + v_rows:
        row["feasible"] = row["budget_j_per_token"] >= e_min
        row["j_over_budget"] = row["j_per_token"] / row["budget_j_per_token"]
    for row in base + budget_rows:
        row.pop("q_trace")  # only the V sweep's are kept
    return {
        "config": asdict(cfg),
        "fixed_k_j_per_token": {"min": e_min, "max": e_max},
        "baselines": base,
        "budget_sweep": budget_rows,
        "per_budget": per_budget(base, budget_rows),
        "v_sweep": {"budget_j_per_token": v_budget, "rows": v_rows},
    }


def per_budget(base: list[dict[str, Any]], budget_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each budget: the best fixed-K within it, lyapunov, gelato, and the oracle."""
    fixed = [r for r in base if r["policy"].startswith("fixed-")]
    oracle = next(r for r in base if r["policy"] == "oracle")
    out = []
    for b in sorted({r["budget_j_per_token"] for r in budget_rows}):
        within = [r for r in fixed if r["j_per_token"] <= b]
        best = max(within, key=lambda r: r["tokens_per_s"]) if within else None
        ctl = {r["policy"]: r for r in budget_rows if r["budget_j_per_token"] == b}
        row: dict[str, Any] = {"budget_j_per_token": b, "best_fixed": _brief(best), "oracle": _brief(oracle)}
        row |= {p: _brief(ctl.get(p)) for p in CONTROLLERS}
        if best:
            row["gelato_vs_best_fixed"] = ctl["gelato"]["tokens_per_s"] / best["tokens_per_s"]
        out.append(row)
    return out


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"label": row["label"], "tokens_per_s": row["tokens_per_s"], "j_per_token": row["j_per_token"]}


# ---------------------------------------------------------------- markdown

COLUMNS = (
    "| policy | tokens/s | mJ/token | J/ē | mean Q (J) | final Q (J) | mean k | acceptance | rounds | ctrl µs/round |"
)


def _row(r: dict[str, Any]) -> str:
    ratio = f"{r['j_over_budget']:.3f}" if "j_over_budget" in r else "–"
    acc = "–" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
    return (
        f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['j_per_token'] * 1e3:.3f} | {ratio} | {r['mean_q_j']:.3f} | "
        f"{r['final_q_j']:.3f} | {r['mean_draft_len']:.2f} | {acc} | {r['rounds']} | "
        f"{r['controller_us_per_round']:.0f} |"
    )


def _cell(b: dict[str, Any] | None) -> str:
    return f"{b['tokens_per_s']:.1f} ({b['j_per_token'] * 1e3:.2f})" if b else "–"


# Every table here is the simulator's: its energy columns come from the fitted (or given) device
# powers, themselves estimates, never from a meter.
SIMULATED_NOTE = (
    "Simulated: tokens/s and energy (mJ) come from the round model, not measured; its device powers are estimates."
)


# What the plots' energy axes say their energy is (the same fact as SIMULATED_NOTE).
SIMULATED_ENERGY = "estimated, simulated"


def markdown(result: dict[str, Any]) -> str:
    sep = "|---|" + "---:|" * (COLUMNS.count("|") - 2)
    lines = [SIMULATED_NOTE, "", "### Baselines (no budget)", "", COLUMNS, sep, *(_row(r) for r in result["baselines"])]
    lines += ["", "### Per budget: tokens/s (mJ/token)", ""]
    lines += [
        "| ē (mJ/token) | best fixed-K within ē | lyapunov | gelato | oracle | gelato / best fixed |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["per_budget"]:
        best = row["best_fixed"]
        name = f"{best['label']}: {_cell(best)}" if best else "none"
        ratio = f"{row['gelato_vs_best_fixed']:.3f}" if "gelato_vs_best_fixed" in row else "–"
        lines.append(
            f"| {row['budget_j_per_token'] * 1e3:.3f} | {name} | {_cell(row['lyapunov'])} | {_cell(row['gelato'])} "
            f"| {_cell(row['oracle'])} | {ratio} |"
        )
    lines += ["", "### Budget sweep", "", COLUMNS, sep, *(_row(r) for r in result["budget_sweep"])]
    vs = result["v_sweep"]
    lines += ["", f"### V sweep at ē = {vs['budget_j_per_token'] * 1e3:.3f} mJ/token", "", COLUMNS, sep]
    lines += [_row(r) for r in vs["rows"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def plot_pareto(result: dict[str, Any], path: Path, energy: str = SIMULATED_ENERGY) -> None:
    """`energy`: where the plotted device energy comes from (estimated or measured, and how), named
    on the x axis; the simulator's own is `SIMULATED_ENERGY`."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    fixed = [r for r in result["baselines"] if r["policy"].startswith("fixed-")]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in result["baselines"]:
        if not r["policy"].startswith("fixed-"):
            groups.setdefault(r["policy"], []).append(r)
    xs = [r["j_per_token"] * 1e3 for r in fixed]
    ax.plot(xs, [r["tokens_per_s"] for r in fixed], "o-", color="grey", label="fixed-K")
    for r in fixed:
        ax.annotate(r["policy"].removeprefix("fixed-"), (r["j_per_token"] * 1e3, r["tokens_per_s"]), fontsize=7)
    markers = {"heuristic": "s", "entropy": "^", "adaedl": "v", "lyapunov": "P", "gelato": "*", "oracle": "D"}
    for p, rs in groups.items():
        x, y = [r["j_per_token"] * 1e3 for r in rs], [r["tokens_per_s"] for r in rs]
        ax.scatter(x, y, marker=markers.get(p, "x"), s=60, label=f"{p} (no budget)")
        for r in rs if p in ("entropy", "adaedl") else ():
            ax.annotate(r["label"].split(" ", 1)[1], (r["j_per_token"] * 1e3, r["tokens_per_s"]), fontsize=6)
    swept = list(dict.fromkeys([*CONTROLLERS, *(r["policy"] for r in result["budget_sweep"])]))
    colors = ("tab:red", "tab:blue", "tab:purple", "tab:olive", "tab:cyan", "tab:brown")
    for i, p in enumerate(swept):
        rs = [r for r in result["budget_sweep"] if r["policy"] == p]
        ax.plot(
            [r["j_per_token"] * 1e3 for r in rs],
            [r["tokens_per_s"] for r in rs],
            "--." if p in CONTROLLERS else ":x",
            color=colors[i % len(colors)],
            label=f"{p}, ē sweep",
        )
    for b in {r["budget_j_per_token"] for r in result["budget_sweep"]}:
        ax.axvline(b * 1e3, color="k", alpha=0.08)
    ax.set_xlabel(f"device energy, {energy} (mJ/token)")
    ax.set_ylabel("throughput (tokens/s per device)")
    ax.set_title("Throughput vs energy (vertical lines: budgets ē)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_v_sweep(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    vs = result["v_sweep"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in CONTROLLERS:
        rs = [r for r in vs["rows"] if r["policy"] == p]
        a1.plot([r["v"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=p)
        a2.plot([r["v"] for r in rs], [r["mean_q_j"] for r in rs], "o-", label=p)
    for ax, label in ((a1, "throughput (tokens/s)"), (a2, f"mean Q (J; energy {SIMULATED_ENERGY})")):
        ax.set_xscale("log")
        ax.set_xlabel("V")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    a2.set_yscale("log")
    fig.suptitle(f"V sweep at ē = {vs['budget_j_per_token'] * 1e3:.3f} mJ/token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_q_trace(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in (r for r in result["v_sweep"]["rows"] if r["policy"] == "gelato"):
        if r["q_trace"]:
            t, q = zip(*r["q_trace"], strict=True)
            ax.plot(t, q, lw=0.8, label=f"V={r['v']:g}")
    ax.set_xlabel("simulated time (s), device 0")
    ax.set_ylabel(f"Q (J; energy {SIMULATED_ENERGY})")
    ax.set_title("gelato: energy-deficit queue Q(t) per V")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "simulate.json", out / "table.md"]
    written[0].write_text(json.dumps(result, indent=1) + "\n")
    written[1].write_text(markdown(result))
    if plots:
        import matplotlib  # only here: the simulator itself needs no plotting library

        matplotlib.use("Agg")  # files only, no display
        for name, fn in (("pareto.png", plot_pareto), ("v_sweep.png", plot_v_sweep), ("q_trace.png", plot_q_trace)):
            fn(result, out / name)
            written.append(out / name)
    return written
