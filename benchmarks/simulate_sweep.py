"""The simulator's sweeps and their outputs (`python -m benchmarks.simulate` drives them).

Contract: `sweep(traces, model, cfg)` runs, on the same devices and prompt order for every policy:
1. baselines: fixed-K for `cfg.fixed_ks`, heuristic, entropy at `cfg.taus`, adaedl at
   `cfg.lambdas`, lyapunov and gelato without a budget, and the oracle;
2. a budget sweep: lyapunov and gelato at each budget ē (default: five budgets from the lowest
   J/token any fixed-K reaches up to what the unconstrained controllers spend, where budgets bind,
   plus the highest fixed-K J/token), V = `cfg.v`;
3. a V sweep at one binding budget (default: `binding_budget`), lyapunov and gelato.
It returns one JSON-ready dict. `write_outputs(result, out)` writes `simulate.json`, `table.md`,
`pareto.png` (tokens/s vs J/token), `v_sweep.png` (tokens/s and mean Q vs V) and `q_trace.png`
(gelato's Q(t) per V); `markdown(result)` is the table the CLI prints.

Pipelining (issue 16; `python -m benchmarks.simulate --pipelining`): `pipelining_sweep(traces,
costs, channel, cfg)` runs, per round trip in `cfg.rtts_ms` and on the same devices and prompt
order: fixed-K for `cfg.fixed_ks` (no pipelining) and the fastest of them also with local
pre-drafting and with send-ahead; gelato without a budget and at ē = the fastest fixed-K's J/token
(the issue's target: more tokens/s at no more J/token), each with pipelining off, local and
send-ahead; the oracle (not pipelined); and the headroom of send-ahead itself, fixed-K with
send-ahead for every K in `cfg.grid_ks` × blocks ahead in `cfg.grid_aheads` (what a controller
choosing block size and depth well could reach). `pipelining_markdown(result)` and
`write_pipelining_outputs(result, out)` (`simulate.json`, `table.md`, `pipelining.png`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.simulate import Channel, Costs, RoundModel, Spec, Trace, run_spec
from device.policy import PIPELINE_MODES, PolicyOptions

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


def markdown(result: dict[str, Any]) -> str:
    sep = "|---|" + "---:|" * (COLUMNS.count("|") - 2)
    lines = ["### Baselines (no budget)", "", COLUMNS, sep, *(_row(r) for r in result["baselines"])]
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


def plot_pareto(result: dict[str, Any], path: Path) -> None:
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
    for p, color in zip(CONTROLLERS, ("tab:red", "tab:blue"), strict=True):
        rs = [r for r in result["budget_sweep"] if r["policy"] == p]
        ax.plot(
            [r["j_per_token"] * 1e3 for r in rs],
            [r["tokens_per_s"] for r in rs],
            "--.",
            color=color,
            label=f"{p}, ē sweep",
        )
    for b in {r["budget_j_per_token"] for r in result["budget_sweep"]}:
        ax.axvline(b * 1e3, color="k", alpha=0.08)
    ax.set_xlabel("device energy (mJ/token)")
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
    for ax, label in ((a1, "throughput (tokens/s)"), (a2, "mean Q (J)")):
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
    ax.set_ylabel("Q (J)")
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


# ---------------------------------------------------------------- pipelining (issue 16)


@dataclass(frozen=True)
class PipelineConfig:
    rtts_ms: tuple[float, ...] = (0, 10, 20, 50, 100)
    devices: int = 1
    tokens_per_device: int = 20000
    seed: int = 0
    fixed_ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
    ahead_blocks: int = PolicyOptions.ahead_blocks
    v: float = PolicyOptions.v  # of the budgeted gelato runs
    k_max: int = 0  # of gelato (0: the edge's block limit)
    guess_match: float | None = None  # None: from the traces (see `RoundModel`)
    grid_ks: tuple[int, ...] = (1, 2, 3, 4)  # send-ahead headroom: fixed K ...
    grid_aheads: tuple[int, ...] = (1, 2, 4, 8)  # ... × blocks ahead


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def pipelining_sweep(traces: list[Trace], costs: Costs, channel: Channel, cfg: PipelineConfig) -> dict[str, Any]:
    out = []
    for rtt_ms in cfg.rtts_ms:
        model = RoundModel(costs, replace(channel, rtt_s=rtt_ms / 1e3), cfg.guess_match)

        def run(spec: Spec, model: RoundModel = model) -> dict[str, Any]:
            r = run_spec(spec, traces, model, cfg.devices, cfg.tokens_per_device, cfg.seed)
            r.pop("q_trace")
            return r

        fixed = [run(Spec(f"fixed-{k}")) for k in cfg.fixed_ks]
        best = max(fixed, key=lambda r: r["tokens_per_s"])
        budget = best["j_per_token"]
        piped = [Spec(best["policy"], pipeline=m, ahead_blocks=cfg.ahead_blocks) for m in PIPELINE_MODES[1:]]
        gelato = [
            Spec("gelato", budget=b, v=cfg.v, k_max=cfg.k_max, pipeline=m, ahead_blocks=cfg.ahead_blocks)
            for b in (None, budget)
            for m in PIPELINE_MODES
        ]
        rows = fixed + [run(s) for s in (*piped, *gelato, Spec("oracle"))]
        grid = [
            run(Spec(f"fixed-{k}", pipeline="send-ahead", ahead_blocks=a)) for k in cfg.grid_ks for a in cfg.grid_aheads
        ]
        for g_row, (k, a) in zip(grid, [(k, a) for k in cfg.grid_ks for a in cfg.grid_aheads], strict=True):
            g_row["k"], g_row["ahead_blocks"] = k, a
        within = [g for g in grid if g["j_per_token"] <= budget]
        headroom = {
            "fastest": _brief(max(grid, key=lambda r: r["tokens_per_s"])) if grid else None,
            "fastest_within_fixed_j": _brief(max(within, key=lambda r: r["tokens_per_s"])) if within else None,
            "grid": [
                {
                    "k": g["k"],
                    "ahead_blocks": g["ahead_blocks"],
                    "label": g["label"],
                    "tokens_per_s": g["tokens_per_s"],
                    "j_per_token": g["j_per_token"],
                    "ahead_hit_rate": g["ahead_hit_rate"],
                }
                for g in grid
            ],
        }
        by = {(r["policy"], r["budget_j_per_token"], r["pipeline"]): r for r in rows}
        compare = {}
        for name, b in (("no_budget", None), ("at_fixed_j", budget)):
            g = {m: by[("gelato", b, m)] for m in PIPELINE_MODES}
            sa = g["send-ahead"]
            compare[name] = {
                "budget_j_per_token": b,
                "send_ahead_vs_fastest_fixed": _ratio(sa["tokens_per_s"], best["tokens_per_s"]),
                "send_ahead_j_vs_fastest_fixed": _ratio(sa["j_per_token"], best["j_per_token"]),
                "send_ahead_vs_off": _ratio(sa["tokens_per_s"], g["off"]["tokens_per_s"]),
                "local_vs_off": _ratio(g["local"]["tokens_per_s"], g["off"]["tokens_per_s"]),
                "target_met": (
                    sa["tokens_per_s"] >= 1.5 * best["tokens_per_s"]
                    and sa["j_per_token"] <= best["j_per_token"]
                    and sa["tokens_per_s"] >= 1.2 * g["off"]["tokens_per_s"]
                ),
                "never_slower_than_off": sa["tokens_per_s"] >= g["off"]["tokens_per_s"],
            }
        out.append(
            {
                "rtt_ms": rtt_ms,
                "fastest_fixed": best["label"],
                "fastest_fixed_tokens_per_s": best["tokens_per_s"],
                "fastest_fixed_j_per_token": best["j_per_token"],
                "gelato": compare,
                "send_ahead_headroom": headroom,
                "runs": rows,
            }
        )
    return {"config": asdict(cfg), "rtts": out}


def _f(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


PIPE_COLUMNS = (
    "| RTT ms | run | tokens/s | mJ/token | mean k | acceptance | sent ahead | stale | unsent | ahead hit rate "
    "| pre-draft hit rate | guess match | wasted tok/tok | wasted mJ/tok | drafting share |"
)


def pipelining_markdown(result: dict[str, Any]) -> str:
    lines = []
    for name, title in (
        ("at_fixed_j", "gelato at ē = the fastest fixed-K's J/token"),
        ("no_budget", "gelato without a budget"),
    ):
        lines += [
            f"### {title}: tokens/s (mJ/token)",
            "",
            "| RTT ms | fastest fixed-K | gelato | gelato +local | gelato +send-ahead | send-ahead ÷ fastest fixed "
            "| J ÷ fixed's | ÷ gelato | local ÷ gelato | ahead hit rate | wasted mJ/tok | target |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in result["rtts"]:
            c = r["gelato"][name]
            g = {
                x["pipeline"]: x
                for x in r["runs"]
                if x["policy"] == "gelato" and x["budget_j_per_token"] == c["budget_j_per_token"]
            }

            def cell(x: dict[str, Any]) -> str:
                return f"{x['tokens_per_s']:.1f} ({x['j_per_token'] * 1e3:.2f})"

            sa = g["send-ahead"]
            lines.append(
                f"| {r['rtt_ms']:g} | {r['fastest_fixed']}: {r['fastest_fixed_tokens_per_s']:.1f} "
                f"({r['fastest_fixed_j_per_token'] * 1e3:.2f}) | {cell(g['off'])} | {cell(g['local'])} | {cell(sa)} "
                f"| {_f(c['send_ahead_vs_fastest_fixed'], '.2f')}× | {_f(c['send_ahead_j_vs_fastest_fixed'], '.2f')} "
                f"| {_f(c['send_ahead_vs_off'], '.2f')}× | {_f(c['local_vs_off'], '.2f')}× "
                f"| {_f(sa['ahead_hit_rate'], '.2f')} | {_f(sa['wasted_j_per_token'], '.3f', 1e3)} "
                f"| {'MET' if c['target_met'] else 'short'} |"
            )
        lines.append("")
    lines += headroom_markdown(result)
    lines += ["### Every run", "", PIPE_COLUMNS, "|---:|---|" + "---:|" * (PIPE_COLUMNS.count("|") - 3)]
    for r in result["rtts"]:
        for x in r["runs"]:
            lines.append(
                f"| {r['rtt_ms']:g} | {x['label']} | {x['tokens_per_s']:.1f} | {x['j_per_token'] * 1e3:.3f} "
                f"| {x['mean_draft_len']:.2f} | {_f(x['acceptance'], '.3f')} | {x['sent_ahead']} | {x['stale']} "
                f"| {x['unsent']} | {_f(x['ahead_hit_rate'], '.3f')} | {_f(x['predraft_hit_rate'], '.3f')} "
                f"| {_f(x['guess_match_rate'], '.3f')} | {x['wasted_tokens_per_token']:.2f} "
                f"| {x['wasted_j_per_token'] * 1e3:.3f} | {x['drafting_share']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def headroom_markdown(result: dict[str, Any]) -> list[str]:
    rtts = [r for r in result["rtts"] if r.get("send_ahead_headroom", {}).get("grid")]
    if not rtts:
        return []
    cfg = result["config"]
    lines = [
        "### Send-ahead headroom: fixed K with N blocks ahead, tokens/s (mJ/token) [ahead hit rate]",
        "",
        "| RTT ms | " + " | ".join(f"K={k}" for k in cfg["grid_ks"]) + " | fastest | fastest within fixed's J |",
        "|---:|" + "---|" * (len(cfg["grid_ks"]) + 2),
    ]
    for r in rtts:
        h = r["send_ahead_headroom"]
        cells = []
        for k in cfg["grid_ks"]:
            row = [g for g in h["grid"] if g["k"] == k]
            cells.append(
                "<br>".join(
                    f"N={g['ahead_blocks']}: {g['tokens_per_s']:.1f} ({g['j_per_token'] * 1e3:.2f}) "
                    f"[{_f(g['ahead_hit_rate'], '.2f')}]"
                    for g in row
                )
            )
        best, fit = h["fastest"], h["fastest_within_fixed_j"]

        def name(b: dict[str, Any] | None, r: dict[str, Any] = r) -> str:
            if not b:
                return "none"
            ratio = b["tokens_per_s"] / r["fastest_fixed_tokens_per_s"]
            return f"{b['label']}: {_cell(b)} = {ratio:.2f}× {r['fastest_fixed']}"

        lines.append(f"| {r['rtt_ms']:g} | " + " | ".join(cells) + f" | {name(best)} | {name(fit)} |")
    return [*lines, ""]


def plot_pipelining(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rtts = [r["rtt_ms"] for r in result["rtts"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(
        rtts, [r["fastest_fixed_tokens_per_s"] for r in result["rtts"]], "o-", color="grey", label="fastest fixed-K"
    )
    for budgeted, style in ((True, "-"), (False, ":")):
        for mode, color in zip(PIPELINE_MODES, ("tab:blue", "tab:orange", "tab:red"), strict=True):
            ys, ratios = [], []
            for r in result["rtts"]:
                b = r["fastest_fixed_j_per_token"] if budgeted else None
                x = next(
                    x
                    for x in r["runs"]
                    if x["policy"] == "gelato" and x["pipeline"] == mode and x["budget_j_per_token"] == b
                )
                ys.append(x["tokens_per_s"])
                ratios.append(x["tokens_per_s"] / r["fastest_fixed_tokens_per_s"])
            label = f"gelato {mode}" + (" (ē = fixed's J/token)" if budgeted else " (no budget)")
            a1.plot(rtts, ys, style, marker=".", color=color, label=label)
            a2.plot(rtts, ratios, style, marker=".", color=color, label=label)
    oracle = [next(x for x in r["runs"] if x["policy"] == "oracle")["tokens_per_s"] for r in result["rtts"]]
    a1.plot(rtts, oracle, "D--", color="k", ms=4, label="oracle (not pipelined)")
    for key, style, label in (
        ("fastest", "^-", "send-ahead headroom: fastest fixed-K × blocks ahead"),
        ("fastest_within_fixed_j", "v-", "… of those within the fixed-K's J/token"),
    ):
        pts = [
            (r["rtt_ms"], h[key]["tokens_per_s"] / r["fastest_fixed_tokens_per_s"])
            for r in result["rtts"]
            if (h := r.get("send_ahead_headroom", {})).get(key)
        ]
        if pts:
            a2.plot(*zip(*pts, strict=True), style, color="tab:green", alpha=0.6, ms=4, label=label)
    a2.plot(
        rtts,
        [o / r["fastest_fixed_tokens_per_s"] for o, r in zip(oracle, result["rtts"], strict=True)],
        "D--",
        color="k",
        ms=4,
        label="oracle (not pipelined)",
    )
    a2.axhline(1.5, color="k", alpha=0.3, ls="--", label="target 1.5×")
    a1.set_yscale("log")
    a1.set_ylabel("tokens/s (per device)")
    a2.set_ylabel("÷ the fastest fixed-K (same RTT)")
    for ax in (a1, a2):
        ax.set_xlabel("round trip (ms)")
        ax.grid(alpha=0.3)
    a2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Pipelined speculation (simulated): gelato off / local pre-drafting / send-ahead")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_pipelining_outputs(result: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "simulate.json", out / "table.md"]
    written[0].write_text(json.dumps(result, indent=1) + "\n")
    written[1].write_text(pipelining_markdown(result))
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        plot_pipelining(result, out / "pipelining.png")
        written.append(out / "pipelining.png")
    return written
