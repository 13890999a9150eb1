"""The simulator's pipelining sweep and its outputs (`python -m gelato.benchmarks.simulate
--pipelining` drives them).

Contract: `pipelining_sweep(traces, costs, channel, cfg)` runs, per round trip in `cfg.rtts_ms` and
on the same devices and prompt order: fixed-K for `cfg.fixed_ks` (no pipelining) and the fastest
of them also with local pre-drafting and with send-ahead; gelato without a budget and at ē = the
fastest fixed-K's J/token (the issue's target: more tokens/s at no more J/token), each with
pipelining off, local and send-ahead; the oracle (not pipelined); and the headroom of send-ahead
itself, fixed-K with send-ahead for every K in `cfg.grid_ks` × blocks ahead in `cfg.grid_aheads`
(what a controller choosing block size and depth well could reach). `pipelining_markdown(result)`
and `write_pipelining_outputs(result, out)` (`simulate.json`, `table.md`, `pipelining.png`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gelato.benchmarks.simulate_device import run_spec
from gelato.benchmarks.simulate_model import Channel, Costs, RoundModel, Spec, Trace
from gelato.benchmarks.simulate_sweep import SIMULATED_NOTE, _brief, _cell
from gelato.device.policy_options import PIPELINE_MODES, PolicyOptions


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
    "| RTT ms | run | tokens/s | mJ/token | mean k | acceptance | verified ahead | stale | unsent | ahead hit rate "
    "| pre-draft hit rate | guess match | wasted tok/tok | wasted mJ/tok | drafting share |"
)


def pipelining_markdown(result: dict[str, Any]) -> str:
    lines = [SIMULATED_NOTE, ""]
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
