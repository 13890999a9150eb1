"""The round-overhead benchmark's report (`gelato.benchmarks.round_overhead`): markdown from its result.

Contract: `markdown(result)` is the whole report (command, machine, the per-part table, the summary
and the overhead outside the model forwards ranked per policy); `table(result)` and
`summary_lines(result)` are its parts. Pure functions of the result dict; nothing is measured here.
"""

from __future__ import annotations

from typing import Any

from gelato.benchmarks.round_overhead_analysis import COMPONENTS, STATUS, ranked_overhead


def ahead_name(policy: str) -> str:
    """A pipelined plain run's name (`--pipeline send-ahead`): fixed-0 with its empty blocks sent
    ahead, fixed-K and gelato with their next block drafted while the edge verifies."""
    return f"{policy} send-ahead"


AHEAD = ahead_name("fixed-0")
STREAMS = "ar-edge"  # the edge decoding alone, streaming its tokens (edge-only without a block per token)
STREAMS_EACH = "ar-edge one a message"  # the same with `--stream-tokens 1`: a message per token


def table(result: dict[str, Any]) -> str:
    pols = result["policies"]
    names = list(pols)
    lines = [
        "| part of a round | where | " + " | ".join(f"{n} ms | {n} %" for n in names) + " |",
        "|---|---|" + "---:|---:|" * len(names),
    ]
    for i, (_key, side, kind, label) in enumerate(COMPONENTS):
        cells = []
        for n in names:
            c = pols[n]["components"][i]
            cells.append(f"{c['ms']:.3f} | {100 * c['ms'] / pols[n]['round_ms']:.1f}")
        tag = {"model": " (model)", "residual": " †"}.get(kind, "")
        lines.append(f"| {label}{tag} | {side} | " + " | ".join(cells) + " |")
    rows = [
        ("round, instrumented (decision to telemetry)", "round_ms"),
        ("round, instrumented, median", "round_ms_median"),
        ("outside the model forwards", "outside_models_ms"),
        ("round by the loop's timer, instrumented", "loop_timer_round_ms"),
        ("round by the loop's timer, plain processes", "plain_round_ms"),
        ("elapsed per round, plain (open, prefills, close included)", "plain_elapsed_per_round_ms"),
        ("floor: raw forwards + bare echo", "floor_ms"),
    ]
    for label, key in rows:
        lines.append(f"| **{label}** | | " + " | ".join(f"{pols[n][key]:.3f} | " for n in names) + " |")
    return "\n".join(lines)


def summary_lines(result: dict[str, Any]) -> list[str]:
    pols, fl, ref = result["policies"], result["floors"], result["references"]
    k = result["meta"]["k"]
    lines = []
    for n, p in pols.items():
        lines.append(
            f"- {n}: plain round {p['plain_round_ms']:.3f} ms (every round) = {p['plain_round_vs_floor']:.2f} × the "
            f"floor {p['floor_ms']:.3f} ms (raw forwards + bare echo); instrumented round {p['round_ms']:.3f} ms "
            f"(without the {p['outlier_rounds_dropped']} preempted rounds; every round "
            f"{p['every_round']['mean_ms']:.3f} ms), "
            f"{p['outside_models_ms']:.3f} ms of it outside the model forwards; edge CPU per verdict "
            f"{_fmt(p.get('edge_cpu_ms_per_verdict'))} ms, {_fmt(p.get('edge_cpu_outside_forward_ms'))} ms of it "
            f"outside the target forward; transit {p['uplink_ms']:.3f} ms up + {p['downlink_ms']:.3f} ms down "
            f"(shared clock); {p['tokens_per_round']:.2f} tokens/round; {_inflation(p)}."
        )
    r, per = result["ratios"], result["ratios_per_repeat"]

    def each(name: str) -> str:
        return ", ".join(f"{x:.2f}" for x in per[name])

    fk = f"fixed-{k}"
    best = result["ratios_of_best"]
    lines.append(
        f"- fixed-0 = {r['fixed0_vs_target_loop']:.2f} × the tokens/s of the target decoding alone in one process "
        f"(a cached greedy loop; per repeat {each('fixed0_vs_target_loop')}; best repeat vs best repeat "
        f"{best['fixed0_vs_target_loop']:.2f}) and {r['fixed0_vs_target_generate']:.2f} × its `generate()` "
        f"({each('fixed0_vs_target_generate')}; best vs best {best['fixed0_vs_target_generate']:.2f}); over all "
        f"repeats {pols['fixed-0']['plain_tokens_per_s']:.1f} vs {ref['target']['loop']['tokens_per_s']:.1f} and "
        f"{ref['target']['generate']['tokens_per_s']:.1f} tokens/s."
    )
    ahead = result["pipelined"][AHEAD]
    lines.append(
        f"- fixed-0 with `--pipeline send-ahead` (each empty block sent before the previous verdict: no round "
        f"trip per token) = {r['fixed0_ahead_vs_target_loop']:.2f} × the target decoding alone (per repeat "
        f"{each('fixed0_ahead_vs_target_loop')}; best vs best {best['fixed0_ahead_vs_target_loop']:.2f}); "
        f"{ahead['tokens_per_s']:.1f} tokens/s over all repeats, elapsed per round "
        f"{ahead['elapsed_per_round_ms']:.3f} ms."
    )
    streamed, each_one = result["streamed"], result.get("streamed_each")
    lines.append(
        f"- {STREAMS} (the device sends one Generate and the edge streams every token: edge-only decoding "
        f"without a block per token; up to {result['meta'].get('stream_tokens', 1)} tokens a message, the "
        f"edge's model thread decoding them in one job) = {r['ar_edge_vs_target_loop']:.2f} × the target "
        f"decoding alone (per repeat {each('ar_edge_vs_target_loop')}; best vs best "
        f"{best['ar_edge_vs_target_loop']:.2f}); {streamed['tokens_per_s']:.1f} tokens/s over all repeats."
    )
    if each_one is not None:
        lines.append(
            f"- {STREAMS} with `--stream-tokens 1` (a message, and a model-thread job, per token) = "
            f"{r['ar_edge_each_vs_target_loop']:.2f} × the target decoding alone (per repeat "
            f"{each('ar_edge_each_vs_target_loop')}; best vs best {best['ar_edge_each_vs_target_loop']:.2f}); "
            f"{each_one['tokens_per_s']:.1f} tokens/s over all repeats; the runs with several tokens a message "
            f"made {r['ar_edge_vs_ar_edge_each']:.2f} × its tokens/s (per repeat {each('ar_edge_vs_ar_edge_each')})."
        )
    lines += _thread_lines(result)
    lines.append(
        f"- {fk} = {r['fixedk_vs_assisted_k']:.2f} × transformers' assisted generation with the same pair at K = {k} "
        f"({each('fixedk_vs_assisted_k')}; best vs best {best['fixedk_vs_assisted_k']:.2f}) and "
        f"{r['fixedk_vs_assisted_defaults']:.2f} × assisted at its defaults ({each('fixedk_vs_assisted_defaults')}; "
        f"best vs best {best['fixedk_vs_assisted_defaults']:.2f}); over all repeats "
        f"{pols[fk]['plain_tokens_per_s']:.1f} vs {ref['assisted'][f'k{k}']['tokens_per_s']:.1f} and "
        f"{ref['assisted']['defaults']['tokens_per_s']:.1f} tokens/s."
    )
    pipe = result["pipelined"]
    ahead_k, ahead_g = pipe[ahead_name(fk)], pipe[ahead_name("gelato")]
    lines.append(
        f"- {fk} with `--pipeline send-ahead` (each block drafted while the edge verifies the one before, sent "
        f"before its verdict, as if that one will be fully accepted) = {r['fixedk_ahead_vs_assisted_k']:.2f} × "
        f"assisted at K = {k} ({each('fixedk_ahead_vs_assisted_k')}; best vs best "
        f"{best['fixedk_ahead_vs_assisted_k']:.2f}) and {r['fixedk_ahead_vs_assisted_defaults']:.2f} × assisted at "
        f"its defaults ({each('fixedk_ahead_vs_assisted_defaults')}; best vs best "
        f"{best['fixedk_ahead_vs_assisted_defaults']:.2f}); `gelato` with send-ahead = "
        f"{r['gelato_ahead_vs_assisted_defaults']:.2f} × assisted at its defaults "
        f"({each('gelato_ahead_vs_assisted_defaults')}; best vs best {best['gelato_ahead_vs_assisted_defaults']:.2f}); "
        f"over all repeats {ahead_k['tokens_per_s']:.1f} and {ahead_g['tokens_per_s']:.1f} tokens/s, "
        f"{ahead_k['tokens'] / ahead_k['rounds']:.2f} and {ahead_g['tokens'] / ahead_g['rounds']:.2f} tokens/round."
    )
    echo = fl["echo"]
    lines.append(
        "- gRPC echo (another process, same options and handler shape), round trip median (p90) / transit "
        "(round trip minus the handler's own time, mean): "
        + "; ".join(
            f"{v} {e['median_ms']:.3f} ({e['p90_ms']:.3f}) / {e['transit_mean_ms']:.3f} ms" for v, e in echo.items()
        )
        + f" ({fl['bytes_up']} B up, {fl['bytes_down']} B down). Variants: "
        + "; ".join(f"{v}: {e['what']}" for v, e in echo.items())
        + ". The rounds' own transit: "
        + ", ".join(f"{n} {p['components'][_index('transit')]['ms']:.3f} ms" for n, p in pols.items())
        + "."
    )
    lines.append(
        f"- raw forwards at {fl['context_tokens']} cached tokens: drafter {fl['drafter_1_ms']:.3f} ms "
        f"({k} of them: {fl['drafter_k_ms']:.3f}); target over 1 / {k + 1} tokens {fl['target_1_ms']:.3f} / "
        f"{fl['target_k1_ms']:.3f} ms on a DynamicCache, {fl['target_pool_1_ms']:.3f} / "
        f"{fl['target_pool_k1_ms']:.3f} ms through the edge's KV pool."
    )
    return lines


def _thread_lines(result: dict[str, Any]) -> list[str]:
    """The plain runs' edge CPU per token by thread, against the model thread's work alone."""
    alone = result["references"].get("model_thread_alone")
    runs = {n: p.get("plain_edge_cpu_ms_per_token") for n, p in result["policies"].items()}
    runs[AHEAD] = result["pipelined"][AHEAD].get("edge_cpu_ms_per_token")
    runs[STREAMS] = result["streamed"].get("edge_cpu_ms_per_token")
    if "streamed_each" in result:
        runs[STREAMS_EACH] = result["streamed_each"].get("edge_cpu_ms_per_token")
    runs = {n: c for n, c in runs.items() if c}
    if not runs or alone is None:
        return []
    parts = "; ".join(
        f"{n}: model thread {c['model']:.3f}, event loop {c['loop']:.3f}, gRPC and other threads {c['other']:.3f} "
        f"(all {sum(c.values()):.3f})"
        for n, c in runs.items()
    )
    line = (
        f"- Edge CPU ms per token in the plain runs, by thread (/proc; open, prefills and close included): {parts}. "
        f"The model thread's fixed-0 work alone in one process (a registry session, `verify_batch` per "
        f"token, no server): {alone['cpu_ms_per_token']:.3f} ms CPU per token "
        f"({1e3 * alone['seconds'] / alone['tokens']:.3f} ms elapsed)"
    )
    same_work = [n for n in runs if n in ("fixed-0", AHEAD, STREAMS, STREAMS_EACH)]  # just that work
    if same_work:
        line += "; in the server the same work costs the model thread " + ", ".join(
            f"{runs[n]['model'] / alone['cpu_ms_per_token']:.2f} × as much ({n})" for n in same_work
        )
    if AHEAD in same_work:  # its edge also verifies the blocks in flight when a generation ends
        line += (
            f" ({AHEAD}: a little less, as its model thread also verifies the empty blocks sent past each "
            "generation's end, at most `--ahead-blocks` per generation)"
        )
    return [line + "."]


def _index(key: str) -> int:
    return next(i for i, c in enumerate(COMPONENTS) if c[0] == key)


def _inflation(p: dict[str, Any]) -> str:
    """What the timers did to the loop's own round timer, every round against every plain round."""
    if "loop_timer_mean_ms" in p["every_round"]:
        return f"the timers made the loop's own round timer read {p['instrumentation_inflation']:.2f} × the plain run's"
    # Runs before 2026-12-07 kept only the loop timer's mean without the dropped rounds, which is no
    # measure against the plain run's mean over every round (it read 0.93× for fixed-0, 114 rounds dropped).
    whole = p["every_round"]["mean_ms"] / p["plain_round_ms"]
    return (
        f"the instrumented round over every round read {whole:.2f} × the plain run's (the loop timer's own mean "
        "over every round was not recorded by this run)"
    )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    out = [
        "# Round overhead — loopback, built-in tiny pair" if meta["pair"] == "embedded" else "# Round overhead",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; {meta['pinning']}; one torch thread per process; transformers "
        f"{meta['transformers']}, grpcio {meta['grpcio']}. Prompts: {meta['prompts']} ({meta['n']}, "
        f"{meta['max_new_tokens']} new tokens, greedy), one warm-up generation per run excluded; plain runs "
        f"and their in-process references alternated {meta['repeats']}×. A shared machine (1-min load average "
        + ", ".join(f"{v:.1f}" for v in meta["load_average_1min"].values())
        + " at the start, before the instrumented runs and at the end): absolute timings drift between runs; "
        "compare "
        "the ratios within this run.",
        "",
        "Mean ms per round. † = a difference between nested timers (thread hops, transit, bookkeeping); "
        "the rest are timed calls of the real functions. The parts sum to the instrumented round, which "
        f"carries ~{meta['instrumentation_us_per_round']:.0f} µs of timers "
        f"({meta['wrapper_cost_us']:.2f} µs per timed call). Rounds slower than median + 5 MAD of their run's "
        "(preempted by another process) are left out of the means: "
        + ", ".join(f"{n} {p['outlier_rounds_dropped']} of {p['rounds']}" for n, p in result["policies"].items())
        + ". Ratios of tokens/s are the median over repeats of each repeat's ratio (both sides measured one "
        "after the other); floors are medians over repeats.",
        "",
        table(result),
        "",
        *summary_lines(result),
        "",
        "## Where the overhead outside the model forwards is, ranked",
        "",
    ]
    for n, p in result["policies"].items():
        out.append(f"### {n} ({p['outside_models_ms']:.3f} ms of a {p['round_ms']:.3f} ms round)")
        out.append("")
        for i, c in enumerate(ranked_overhead(p), 1):
            if c["ms"] < 0.005:
                break
            share = 100 * c["ms"] / p["outside_models_ms"] if p["outside_models_ms"] > 0 else 0.0
            note = STATUS.get(c["key"], "")
            if c["key"] == "transit":
                echo = result["floors"]["echo"]
                note = (
                    "echo transits: "
                    + ", ".join(f"{v} {e['transit_mean_ms']:.3f}" for v, e in echo.items())
                    + f" ms. {note}"
                )
            out.append(f"{i}. {c['label']} — {c['ms']:.3f} ms ({share:.0f} %): {note}")
        out.append("")
    return "\n".join(out)
