"""Scoring, targets, the markdown table and the plots of `gelato-bench gsm8k`.

Contract. `gsm8k_answer(text)` is the number after the first `#### ` mark (commas and `$` dropped;
in a text of several marks, a markdown heading such as `#### 1. Eggs` is no mark), else in the last
`\boxed{}`, else after the last "the answer is", None without any; `score(records, gold)` adds
`correct` per record (None for a question without a gold number) and returns the accuracy over the
scored questions.
`targets(rows, oracle_rows)` checks the benchmark's targets on one run's rows: gelato vs the fastest
fixed-K (K ≥ 1) at no more device J/token (goal ≥ 1.2× without pipelining, ≥ 1.5× with it, local
or send-ahead), gelato ≥ 0.9× the oracle, every speculative policy faster than fixed-0; and
pipelining's: a pipelined gelato run ≥ 1.2× the same configuration (budget, V) without it; and for
every run with an energy budget ē, whether it kept it: device J/token ≤ 1.05 ē, for the run and for
its worst device (the controller keeps the long-run average ≤ ē; a finite run may overshoot by
about its deficit queue Q over its tokens, hence the 5 % allowance). Rows from
older results carry `pipeline` as a bool (True: local); both are read. `markdown(result)` is the
results table with the run's settings, channel (nominal next to measured), the pipelining
figures (send-ahead hit rate, pre-draft hit rate, wasted drafted tokens and J per output token)
and targets; for N > 1 devices its latency column is `worst device p50 / p99 ms/token` (the highest
per-device p50 and p99, not fleet-wide percentiles), and its notes say so.
`plots(result, rounds, out)` writes pareto.png (reusing `gelato.benchmarks.simulate_sweep.plot_pareto`),
q_trace.png, draft_hist.png, calibration.png and, for N > 1 devices, devices.png.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gelato.benchmarks.bench_run import pipeline_mode

NUMBER = r"\$?\s*(-?[\d,]*\.?\d+)"
# GSM8K's own format (and the built-in pair's): the whole number on the mark's line. A mark reading
# "#### 1. Eggs per day" (or "1) ...") is an instruct model's markdown heading, a section and not an
# answer, where the text has another answer (a plain mark, a \boxed{} or "the answer is"); the
# only mark and no other answer, it is the answer ("#### 18. So she makes 18 dollars.").
ANSWER_RE = re.compile(r"####[ \t]*\$?[ \t]*(-?[\d,]*\.?\d+)(?!\d|,\d|\.\d)")
HEADING_RE = re.compile(r"[.)][ \t]+[A-Za-z]")
# What instruct models write when asked (`gelato-bench gsm8k --instruction`): the last of them counts.
BOXED_RE = re.compile(r"\\boxed\{\s*" + NUMBER + r"\s*\}")
SAYS_RE = re.compile(r"[Tt]he (?:final )?answer is:?\s*" + NUMBER)
CONTROLLERS = ("lyapunov", "gelato")


def _asked(settings: dict[str, Any]) -> str:
    """The instruction every question carried (`--instruction`), as the table says it."""
    text = settings.get("instruction", "")
    return f", each followed by {text!r}" if text else ""


def gsm8k_answer(text: str) -> float | None:
    """The number after GSM8K's `#### `, else in the last `\\boxed{...}`, else after the last
    "the answer is"; None when there is none."""
    text = text or ""
    marks = list(ANSWER_RE.finditer(text))
    plain = [m for m in marks if not HEADING_RE.match(text, m.end())]
    found = BOXED_RE.findall(text) or SAYS_RE.findall(text)
    if plain:
        number: str | None = plain[0].group(1)
    elif found:
        number = found[-1]
    else:
        number = marks[0].group(1) if marks and text.count("####") == 1 else None
    if number is None:
        return None
    try:
        return float(number.replace(",", ""))
    except ValueError:
        return None


def score(records: list[dict[str, Any]], gold: list[float | None]) -> float | None:
    """Adds `correct` to each record (None where the question has no gold number: unscored) and
    returns the accuracy over the scored ones (None: none is)."""
    scored = 0
    for r in records:
        want, pred = gold[r["question"]], gsm8k_answer(r.get("text", ""))
        r["correct"] = None if want is None else pred is not None and abs(pred - want) < 1e-6
        scored += want is not None
    return sum(bool(r["correct"]) for r in records) / scored if scored else None


def exact_match(ids: dict[int, list[int]], reference: dict[int, list[int]]) -> tuple[int, int]:
    same = sum(ids.get(q) == ref for q, ref in reference.items())
    return same, len(reference)


# ---------------------------------------------------------------- targets


def _fastest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [r for r in rows if r.get("tokens_per_s")]
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def gelato_vs_fixed(g: dict[str, Any], fixed: list[dict[str, Any]], goal: float) -> dict[str, Any]:
    """g against the best fixed-K in hindsight (K ≥ 1, the fastest): met when g is ≥ `goal`× as fast
    at no more device J/token. Also, the Pareto view: the fastest fixed-K spending at least g's J/token."""
    jg = g.get("energy_j_per_token")
    best = _fastest(fixed)
    fits = [f for f in fixed if jg is not None and (f["energy_j_per_token"] or 0) >= jg]
    best_fit = _fastest(fits)
    speedup: float | None = g["tokens_per_s"] / best["tokens_per_s"] if best else None
    jb = best["energy_j_per_token"] if best else None
    energy_ratio = jg / jb if jg is not None and jb else None
    # A fixed K both faster and no dearer per token: then g is off the fixed-K frontier, whatever
    # the Pareto view's ratio says (that compares with the slower, dearer fixed Ks only).
    no_dearer = [f for f in fixed if jg is not None and f.get("energy_j_per_token") is not None]
    no_dearer = [f for f in no_dearer if f["energy_j_per_token"] <= jg]
    dominating = _fastest([f for f in no_dearer if f["tokens_per_s"] > g["tokens_per_s"]])
    return {
        "label": g["label"],
        "tokens_per_s": g["tokens_per_s"],
        "energy_j_per_token": jg,
        "dominated_by": dominating and dominating["label"],
        "best_fixed": best and best["label"],
        "speedup_vs_best_fixed": speedup,
        "energy_ratio_vs_best_fixed": energy_ratio,
        "goal": goal,
        # No fixed-K run (or no energy) to compare with: not measured (None), never "falls short".
        "met": None if speedup is None or energy_ratio is None else speedup >= goal and energy_ratio <= 1.0,
        "fastest_fixed_at_no_less_energy": best_fit and best_fit["label"],
        "speedup_at_no_more_energy": best_fit and g["tokens_per_s"] / best_fit["tokens_per_s"],
    }


def targets(rows: list[dict[str, Any]], oracle_rows: list[dict[str, Any]], k_max: int) -> dict[str, Any]:
    fixed = [r for r in rows if r["family"] == "fixed" and r["policy"] != "fixed-0"]
    f0 = next((r for r in rows if r["policy"] == "fixed-0"), None)
    orc = next((o for o in oracle_rows if o["k_cap"] == k_max), oracle_rows[0] if oracle_rows else None)
    out: dict[str, Any] = {"gelato": [], "beats_fixed0": {}, "oracle": orc and orc["label"]}
    gelato = [r for r in rows if r["family"] == "gelato"]
    for g in gelato:
        mode = pipeline_mode(g.get("pipeline"))
        row = gelato_vs_fixed(g, fixed, 1.5 if mode != "off" else 1.2)
        row["pipeline"] = mode
        row["vs_oracle"] = orc and g["tokens_per_s"] / orc["tokens_per_s"]
        # No oracle row (--no-oracle): not measured (None), never "falls short". A pipelined run
        # is not judged by it either: the oracle's rounds go one at a time, so it bounds no chain.
        row["oracle_met"] = None if row["vs_oracle"] is None or mode != "off" else row["vs_oracle"] >= 0.9
        plain = next((r for r in gelato if pipeline_mode(r.get("pipeline")) == "off" and _same_config(r, g)), None)
        if mode != "off" and plain is not None and plain.get("tokens_per_s"):
            row["unpipelined"] = plain["label"]
            row["speedup_vs_unpipelined"] = g["tokens_per_s"] / plain["tokens_per_s"]
            row["unpipelined_met"] = row["speedup_vs_unpipelined"] >= 1.2
        out["gelato"].append(row)
    # Every budgeted run gets a verdict line: one without an energy reading says so (it was left out).
    out["budgets"] = [budget_kept(r) for r in rows if r.get("budget_j_per_token")]
    out["fixed_device_spread"] = device_spread(fixed) if out["budgets"] else None
    if f0:
        for r in rows:
            if r["policy"] not in ("ar-edge", "ar-device", "fixed-0") and r.get("tokens_per_s"):
                out["beats_fixed0"][r["label"]] = r["tokens_per_s"] > f0["tokens_per_s"]
    return out


BUDGET_SLACK = 1.05  # a finite run may overshoot ē by about Q / tokens: the allowance gelato-bench policies uses too


def device_j_per_token(r: dict[str, Any]) -> dict[int, float]:
    """Each device's J/token over its questions (from `per_question`); a device with a question
    without energy has none (over the rest of its questions it would read low)."""
    joules: dict[int, float] = {}
    tokens: dict[int, int] = {}
    unread = {q["device"] for q in r.get("per_question") or [] if q.get("energy_j") is None and q.get("n_tokens")}
    for q in r.get("per_question") or []:
        if q.get("energy_j") is None or not q.get("n_tokens") or q["device"] in unread:
            continue
        joules[q["device"]] = joules.get(q["device"], 0.0) + q["energy_j"]
        tokens[q["device"]] = tokens.get(q["device"], 0) + q["n_tokens"]
    return {d: joules[d] / tokens[d] for d in sorted(joules)}


def device_spread(fixed: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How far one device of a fixed-K run (no budget to keep) lies above its run's J/token: the
    floor under a budgeted run's worst-device ratio (each device draws other questions; a radio
    tail after its last one weighs most on the device with the fewest tokens). None with one
    device or no energy."""
    worst: dict[str, float] = {}
    for r in fixed:
        per_device = device_j_per_token(r)
        if len(per_device) > 1 and r.get("energy_j_per_token"):
            worst[r["label"]] = max(per_device.values()) / r["energy_j_per_token"]
    if not worst:
        return None
    return {"min": min(worst.values()), "max": max(worst.values()), "runs": worst}


def budget_kept(r: dict[str, Any]) -> dict[str, Any]:
    """A budgeted run's spend against its ē: the run's J/token and its worst device's, as ratios."""
    budget = r["budget_j_per_token"]
    per_device = device_j_per_token(r)
    # One device: its J/token is the run's, no second clause.
    worst = max(per_device, key=lambda d: per_device[d]) if len(per_device) > 1 else None
    spent = r.get("energy_j_per_token")
    if spent is None:  # no energy reading: not measured, never "kept"
        return {"label": r["label"], "budget_j_per_token": budget, "energy_j_per_token": None, "kept": None}
    ratio = spent / budget
    worst_ratio = per_device[worst] / budget if worst is not None else None
    q_max = r.get("q_max_j")
    return {
        "label": r["label"],
        "budget_j_per_token": budget,
        "energy_j_per_token": r["energy_j_per_token"],
        "ratio": ratio,
        "worst_device": worst,
        "worst_device_ratio": worst_ratio,
        "q_max_j": q_max,
        "kept": ratio <= BUDGET_SLACK and (worst_ratio is None or worst_ratio <= BUDGET_SLACK),
    }


def _same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("budget_j_per_token") == b.get("budget_j_per_token") and a.get("v") == b.get("v")


# ---------------------------------------------------------------- markdown


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


WORST_LATENCY = "worst device p50 / p99 ms/token"
WORST_LATENCY_NOTE = (
    "worst device p50 / p99: the highest of the devices' own p50 and the highest of their own p99 latency "
    "per token (each device's percentiles over its tokens, not percentiles over the whole fleet's tokens). "
    "Σ device tokens/s: the sum of each device's own rate, the fleet's only while all generate at once; "
    "fleet tokens/s: all tokens ÷ (the last question's end − the first one's start), '-' for runs recorded "
    "before question times were kept."
)


def worst_device_latency(r: dict[str, Any]) -> tuple[float | None, float | None]:
    """The highest per-device p50 and the highest per-device p99 (ms/token); None where no device has one."""
    devs = r.get("per_device", [])
    p50 = max((d["latency_p50_ms"] for d in devs if d.get("latency_p50_ms") is not None), default=None)
    p99 = max((d["latency_p99_ms"] for d in devs if d.get("latency_p99_ms") is not None), default=None)
    return p50, p99


def table(rows: list[dict[str, Any]], devices: int) -> list[str]:
    agg = devices > 1
    head = "| run | tokens/s/device |" + (f" Σ device tokens/s | fleet tokens/s | {WORST_LATENCY} |" if agg else "")
    head += (
        " device mJ/token | energy source | mean device W | acceptance | mean draft | rounds | bytes up/down per token"
        " | edge ms/token | ahead hit | pre-draft hit | wasted tok/tok | wasted mJ/tok | GSM8K acc | exact vs ar-edge |"
    )
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        lat = ""
        if agg:
            p50, p99 = worst_device_latency(r)
            lat = f" {_f(r.get('aggregate_tokens_per_s'), '.1f')} | {_f(r.get('fleet_tokens_per_s'), '.1f')} |"
            lat += f" {_f(p50, '.1f')} / {_f(p99, '.1f')} |"
        tok = r.get("tokens") or 0
        bytes_pt = f"{r['bytes_up'] / tok:.0f} / {r['bytes_down'] / tok:.0f}" if tok and "bytes_up" in r else "-"
        jpt = r.get("energy_j_per_token")
        lines.append(
            f"| {r['label']} | {_f(r.get('tokens_per_s'), '.1f')} |{lat} {_f(jpt and jpt * 1e3, '.2f')} "
            f"| {', '.join(r.get('energy', [])) or '-'} | {_f(r.get('mean_power_w'), '.2f')} "
            f"| {_f(r.get('acceptance'), '.3f')} | {_f(r.get('mean_draft_len'), '.2f')} | {r.get('rounds', '-')} "
            f"| {bytes_pt} | {_f((r.get('edge_compute_s_per_token') or 0) * 1e3 or None, '.2f')} "
            f"| {_pipeline_cells(r)} | {_f(r.get('gsm8k_accuracy'), '.3f')} | {r.get('exact_match', '-')} |"
        )
    return lines


def _pipeline_cells(r: dict[str, Any]) -> str:
    """ahead hit | pre-draft hit | wasted tok/tok | wasted mJ/tok; '-' for a run without pipelining."""
    if pipeline_mode(r.get("pipeline")) == "off":
        return "- | - | - | -"
    wj = r.get("wasted_j_per_token")
    return (
        f"{_f(r.get('ahead_hit_rate'), '.2f')} | {_f(r.get('predraft_hit_rate'), '.2f')} "
        f"| {_f(r.get('wasted_tokens_per_token'), '.2f')} | {_f(wj and wj * 1e3, '.3f')}"
    )


def ratio_text(x: float | None, goal: float, at_most: bool = False) -> str:
    """`x` to 2 decimals, or more where 2 would print the goal for a ratio on the wrong side of it:
    short of a goal to reach (1.1958 against 1.2 reads 1.196, not 1.20 next to FALLS SHORT), or,
    `at_most`, over a limit (1.0015 against ≤ 1 reads 1.002, not 1.00)."""
    if x is None:
        return "-"
    for places in (2, 3, 4):
        text = f"{x:.{places}f}"
        hidden = goal >= float(text) and x > goal if at_most else x < goal <= float(text)
        if not hidden:
            return text
    return text


def _oracle_part(g: dict[str, Any], oracle: str | None, mark: dict[bool, str]) -> str:
    if g.get("vs_oracle") is None:  # no oracle row was made (--no-oracle): nothing was compared
        return "the oracle: not measured (no oracle row)"
    ratio = f"{ratio_text(g['vs_oracle'], 0.9)}× {oracle}"
    if g.get("oracle_met") is None:  # a pipelined run: the oracle's rounds are not pipelined
        return f"{ratio} (not a bound for a pipelined run: the oracle's rounds go one at a time)"
    return f"{ratio} (goal ≥ 0.9×): **{mark[g['oracle_met']]}**"


def _pareto_part(g: dict[str, Any]) -> str:
    if g.get("energy_j_per_token") is None:
        return "Pareto view: not measured (no energy reading)"
    fit = g["fastest_fixed_at_no_less_energy"]
    text = (
        f"Pareto view: {ratio_text(g['speedup_at_no_more_energy'], 1.0)}× {fit} (the fastest fixed-K spending at "
        "least as much)"
        if fit
        else "Pareto view: no fixed-K spends as much per token"
    )
    if g.get("dominated_by"):
        text += f", but {g['dominated_by']} is faster at no more J/token"
    return text


def target_lines(t: dict[str, Any]) -> list[str]:
    mark = {True: "MET", False: "FALLS SHORT"}
    out = []
    for g in t["gelato"]:
        energy = ratio_text(g["energy_ratio_vs_best_fixed"], 1.0, at_most=True)
        versus = (
            f"{ratio_text(g['speedup_vs_best_fixed'], g['goal'])}× the best fixed-K ({g['best_fixed']}) at {energy}× "
            f"its J/token (goal ≥ {g['goal']}× at ≤ 1×): **{mark[g['met']]}**"
            if g["met"] is not None
            else f"against the best fixed-K (goal ≥ {g['goal']}× at ≤ 1× its J/token): not measured "
            + ("(no fixed-K run)" if g["best_fixed"] is None else "(no energy reading)")
        )
        out.append(
            f"- {g['label']}: {g['tokens_per_s']:.1f} tok/s = {versus}; {_pareto_part(g)}; "
            f"{_oracle_part(g, t['oracle'], mark)}"
            + (
                f"; {ratio_text(g['speedup_vs_unpipelined'], 1.2)}× {g['unpipelined']} without pipelining (goal "
                f"≥ 1.2×): **{mark[g['unpipelined_met']]}**"
                if "speedup_vs_unpipelined" in g
                else ""
            )
        )
    out += budget_lines(t.get("budgets") or [])
    spread = t.get("fixed_device_spread")
    if spread:
        out.append(
            f"- for scale, the fixed-K runs (no budget to keep): their worst device at {spread['min']:.2f}–"
            f"{spread['max']:.2f}× their own run's J/token (each device draws other questions)"
        )
    losers = [k for k, v in t["beats_fixed0"].items() if not v]
    if not t["beats_fixed0"]:  # no fixed-0 run (or nothing to compare with it): nothing was checked
        verdict = "not measured (no fixed-0 run)"
    else:
        verdict = "**MET**" if not losers else "**FALLS SHORT** (" + ", ".join(losers) + ")"
    out.append(f"- every speculative run faster than fixed-0: {verdict}")
    return out


def budget_lines(budgets: list[dict[str, Any]]) -> list[str]:
    out = []
    for b in budgets:
        if b["energy_j_per_token"] is None:
            out.append(
                f"- {b['label']}: its budget ē = {b['budget_j_per_token'] * 1e3:.2f} mJ/token: not measured "
                "(no energy reading)"
            )
            continue
        worst = ""
        if b["worst_device"] is not None and b["worst_device_ratio"] is not None:
            worst_ratio = ratio_text(b["worst_device_ratio"], BUDGET_SLACK, True)
            worst = f"; its worst device (device {b['worst_device']}) {worst_ratio}× ē"
        q = f"; peak Q {b['q_max_j']:.2f} J" if b.get("q_max_j") is not None else ""
        out.append(
            f"- {b['label']}: {b['energy_j_per_token'] * 1e3:.2f} mJ/token = "
            f"{ratio_text(b['ratio'], BUDGET_SLACK, True)}× its budget ē = {b['budget_j_per_token'] * 1e3:.2f} mJ/token"
            f"{worst}{q} (goal ≤ {BUDGET_SLACK}× ē, run and every device): "
            f"**{'KEPT' if b['kept'] else 'OVER BUDGET'}**"
        )
    return out


def _realised(loss: dict[str, Any] | None) -> str:
    """The loss the runs met (the devices' relay's counts), where it was counted."""
    if not loss:
        return ""
    rate = "" if loss["rate"] is None else f", {loss['rate']:.4f}"
    return f" (realised over all runs: {loss['lost']} of {loss['segments']} segments lost{rate})"


def _rebuilt_line(rebuilt: dict[str, Any] | None) -> list[str]:
    if not rebuilt:
        return []
    commit = (rebuilt["code"].get("commit") or "unknown")[:12]
    return [f"Rebuilt from this run's files (`gelato-bench report`) at commit {commit}: {rebuilt['recomputed']}.  "]


def markdown(result: dict[str, Any]) -> str:
    s, ch = result["settings"], result["channel"]
    meas = ch.get("measured_before", {}).get("measured", {})
    nom = ch.get("measured_before", {}).get("nominal", {})
    after = ch.get("measured_after", {}).get("measured", {})
    mech = "; ".join(f"{k}: {v}" for k, v in ch["mechanisms"].items())
    rows = result["runs"] + result["references"]
    lines = [
        f"# GSM8K, {s['devices']} device(s), channel `{ch['profile']['name']}`",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {result['pinning']}.  ",
        *_rebuilt_line(result.get("rebuilt")),
        f"Channel nominal: RTT {_f(nom.get('rtt_ms'), 'g')} ms, up {_f(nom.get('up_mbit'), 'g')} / down "
        f"{_f(nom.get('down_mbit'), 'g')} Mbit/s, jitter ±{ch['profile']['jitter_ms']:g} ms one way, loss "
        f"{ch['profile']['loss']:g}{_realised(ch.get('realised_loss'))}. Measured through the same path before / "
        f"after the runs: RTT "
        f"{_f(meas.get('rtt_ms'), '.2f')} / {_f(after.get('rtt_ms'), '.2f')} ms (64-byte echoes, median); a gRPC "
        f"Info round trip takes {_f(meas.get('grpc_added_rtt_ms'), '.2f')} ms more through the channel than direct "
        f"to the edge (median, before the runs); up {_f(meas.get('up_mbit'), '.1f')} / down "
        f"{_f(meas.get('down_mbit'), '.1f')} Mbit/s.  ",
        f"Mechanisms: {mech}.  ",
        f"{s['questions']} GSM8K test questions (first lines of {s['data']}){_asked(s)}, greedy, ≤ "
        f"{s['max_new_tokens']} new tokens, adaptive policies capped at K_max = {s['k_max']}. "
        f"{result['energy_note']}  ",
        "tokens/s: ratio of sums over questions, per device; edge ms/token: the edge's verify compute, each "
        "batched forward's time divided among its rows (runs recorded before 2026-12-05: the whole forward's "
        "time for each row, which counts a forward once per device batched in it); pipelined "
        "runs (`+local`, `+send-ahead`): ahead hit = blocks sent ahead that were verified ÷ (those + the stale ones), "
        "pre-draft hit = rounds whose pre-draft (or block in flight after them) started the next block ÷ rounds "
        "with one, wasted = drafted tokens thrown away and their drafting mJ per output token (send-ahead: "
        "the device's own estimate per round, its cost model's drafting time × drafting power; local "
        "pre-drafting: the tokens × the run's metered drafting J per drafted token); acceptance and mean "
        "draft: of the verified blocks (a pipelined run also drafted the wasted tokens; `ar-device` has "
        "none: no target checked its drafts). "
        "`assisted` is transformers' assisted generation in ONE process with no network (a reference for the "
        "algorithm, not comparable in tokens/s); `oracle` rows are simulated from this run's verdicts and its "
        "fixed-K runs' costs (times as measured, energy as their meter gave it: see the oracle rows' energy source; "
        "calibrated on the fixed-K runs; the model's fidelity on each, with it left out of the time and energy "
        "scales (not of the cost fit or the per-question overheads, which use every run), "
        "is in summary.json)." + (f" {WORST_LATENCY_NOTE}" if s["devices"] > 1 else ""),
        "",
        *table(rows, s["devices"]),
        "",
        *[f"`{r['label']}` ran transformers' {r['mode']}." for r in result["references"] if r.get("mode")],
        "",
        "## Targets",
        "",
        *target_lines(result["targets"]),
        "",
    ]
    if result.get("lossless_failures"):
        lines.append("**LOSSLESSNESS VIOLATED**: " + "; ".join(result["lossless_failures"]))
    else:
        lines.append("Losslessness: every edge-verified run's output equals ar-edge's token for token.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


PLOT_NAMES = ("pareto.png", "q_trace.png", "draft_hist.png", "calibration.png", "devices.png")


def plots(result: dict[str, Any], rounds: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """Every plot this run has data for; a plot it has none for that an earlier run in the folder
    (`--force`) left is removed: a folder holds one run's files."""
    import matplotlib

    matplotlib.use("Agg")
    from gelato.benchmarks import bench_plots

    written = []
    for name, fn in (
        ("pareto.png", bench_plots.pareto),
        ("q_trace.png", bench_plots.q_trace),
        ("draft_hist.png", bench_plots.draft_hist),
        ("calibration.png", bench_plots.calibration),
    ):
        if fn(result, rounds, out / name):
            written.append(out / name)
    if result["settings"]["devices"] > 1 and bench_plots.devices(result, rounds, out / "devices.png"):
        written.append(out / "devices.png")
    for name in PLOT_NAMES:
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    return written
