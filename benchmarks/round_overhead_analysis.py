"""The decomposition of a round in the round-overhead benchmark (`gelato.benchmarks.round_overhead`).

Contract: `COMPONENTS` lists the disjoint parts of a round, in round order, as (key, side, kind,
label); `STATUS` what each part is, what was done about it and what is left.
`decompose(device_units, edge_units)` gives the mean ms per round of every component (they sum to
the round) from matched rounds; `summarize_policy(name, device, edge, plain, floors, k)` one
policy's figures (outlier rounds dropped, transit split by the shared clock, CPU per verdict and
round, floor and ratios); `ranked_overhead(policy)` the components outside the model forwards,
largest first.
"""

from __future__ import annotations

import statistics
from typing import Any

# (key, where it runs, kind, label). "model": a model forward; "measured": a timed call; "residual":
# the difference between nested timers. In round order; they sum to the round.
COMPONENTS: list[tuple[str, str, str, str]] = [
    ("loop", "device", "residual", "round loop: policy, energy accounting, telemetry"),
    ("hops", "device", "residual", "drafter-thread hops (run_in_executor of a block's drafting)"),
    ("draft_forward", "device", "model", "drafter forwards"),
    ("entropy", "device", "measured", "entropy of each draft's distribution"),
    ("draft_other", "device", "residual", "drafting other (input tensors, logits slices, argmax, DraftBlock)"),
    ("encode", "device", "measured", "encode DraftBlock"),
    ("transit", "wire", "residual", "gRPC transit both ways (write + read - edge handler)"),
    ("parse", "edge", "measured", "parse DeviceMessage"),
    ("decode_block", "edge", "measured", "decode + validate the block"),
    ("checks", "edge", "measured", "session checks (event loop and model thread)"),
    ("queue", "edge", "residual", "batcher queue + event loop <-> model thread hops"),
    ("model_forward", "edge", "model", "target forward"),
    ("pool", "edge", "residual", "KV-pool bookkeeping (ids, mask, positions, cache object, logits)"),
    ("accept", "edge", "measured", "acceptance + KV rollback"),
    ("model_thread_other", "edge", "residual", "model-thread other (batch checks, outcomes)"),
    ("encode_verdict", "edge", "measured", "encode Verdict"),
    ("handler_other", "edge", "residual", "edge handler other (Verdict build, awaits)"),
    ("decode", "device", "measured", "decode Verdict"),
    ("apply", "device", "measured", "verdict apply (drafter rollback)"),
]

# What each part is, what was done about it and what is left (the ranked lists of the report
# print these). Kept current with the code: a line here names a change only once it has landed or
# was measured and dropped (the README's "Per-round overhead" has the measurements).
STATUS = {
    "transit": "Mostly waking the side that slept in epoll while the other computed (the echo variants below "
    "the table: time-limited reads and protobuf add little to a back-to-back echo, an idle gap adds most). "
    "Done: reads limited through `gelato.deadline.within` (`asyncio.timeout`, no task per read). Tried, no "
    "gain: busy-polling before sleeping; gRPC core's EventEngine endpoints off; a handler that writes with "
    "`context.write` instead of yielding. Left: the wake-ups grpc.aio's threads impose.",
    "hops": "One drafter-thread round trip per drafting round (a wake-up of the drafter thread, a self-pipe "
    "wake-up of the loop). Done: verdict apply, settle and empty blocks run on the loop's thread, so only "
    "drafting crosses. Left: the crossing itself, which keeps drafter forwards off the event loop.",
    "queue": "The event loop <-> model thread hand-off. Done: a lone request (one open session, nothing queued "
    "or in flight) goes to the model thread without the batcher task; a batch's futures are resolved by one "
    "`call_soon_threadsafe`. Tried, no gain: forwards in a model worker process; chaining blocks sent ahead "
    "onto their parent on the model thread. Left: the two thread wake-ups per verdict.",
    "loop": "Policy decide/observe, energy accounting and Telemetry. Done: Telemetry built once per round. "
    "Left: small per-round Python work (a further `replace` is ~9 µs, not worth the code).",
    "pool": "The KV pool's small torch calls around the model. Done: lengths as Python ints, ids and "
    "positions to torch in one call, slot index tensors reused (a lone session's KV written as a slice), no "
    "mask for one-query rows at equal ends (SDPA, full attention). Left: a ragged batch's mask, per forward.",
    "checks": "Done: the block's data validated once at decode (`check_data`); only the cheap state checks "
    "(`check_state`) run on the event loop and again on the model thread.",
    "decode_block": "A tuple of ints and a range scan per block: its size is the block's.",
    "parse": "The service parses raw bytes itself (for a precise INVALID_ARGUMENT): one parse per message.",
    "encode_verdict": "Two message objects per verdict (EdgeMessage + Verdict): cheap.",
    "handler_other": "The Verdict dataclass and the handler's awaits: small.",
    "model_thread_other": "Per-batch duplicate-session scan, outcomes keyed by id(): small.",
    "draft_other": "Done: `KVSequence.forward_last` (the last row's logits only, the previous argmax fed as "
    "is, one inference-mode scope per block). Left: argmax and slicing per token.",
    "entropy": "One pass over the vocabulary per draft (`entropy_nats`); computed for every policy, since "
    "the calibrator and the telemetry use it.",
    "encode": "A SparseDist per token when sampling; greedy: one message, cheap.",
    "decode": "One Verdict dataclass: cheap.",
    "apply": "`set_tail` + `DynamicCache.crop` per layer: small.",
    "accept": "Argmax over K+1 rows + `.tolist()` + set_tail: small.",
}


def _mean_units(units: list[dict[str, Any]]) -> dict[str, float]:
    keys = {
        k for u in units for k in u if isinstance(u[k], float | int) and not isinstance(u[k], bool) and k[:3] != "at_"
    }
    return {k: statistics.fmean(float(u.get(k, 0.0)) for u in units) for k in keys}


def decompose(device_units: list[dict[str, Any]], edge_units: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ms per round of every component (they sum to the round), from matched rounds."""
    d, e = _mean_units(device_units), _mean_units(edge_units)

    def g(src: dict[str, float], *keys: str) -> float:
        return sum(src.get(k, 0.0) for k in keys)

    handler = g(e, "total")
    parts = {
        # Drafting and applying run on the drafter thread (inside `offload`) or, when they need no
        # forward, on the loop's own thread (`*_inline`): only the former are inside the hops.
        "loop": g(d, "total") - g(d, "offload", "encode", "write", "read", "decode", "draft_inline", "apply_inline"),
        "hops": g(d, "offload") - g(d, "draft", "apply"),
        "draft_forward": g(d, "draft_forward"),
        "entropy": g(d, "entropy"),
        "draft_other": g(d, "draft", "draft_inline") - g(d, "draft_forward", "entropy"),
        "encode": g(d, "encode"),
        "transit": g(d, "write", "read") - handler,
        "parse": g(e, "parse"),
        "decode_block": g(e, "decode_block"),
        "checks": g(e, "check_loop", "check_model_thread"),
        "queue": g(e, "batcher_verify") - g(e, "model_thread"),
        "model_forward": g(e, "model_forward"),
        "pool": g(e, "pooled_forward") - g(e, "model_forward"),
        "accept": g(e, "accept"),
        "model_thread_other": g(e, "model_thread") - g(e, "pooled_forward", "accept", "check_model_thread"),
        "encode_verdict": g(e, "encode_verdict"),
        "handler_other": handler - g(e, "parse", "decode_block", "check_loop", "batcher_verify", "encode_verdict"),
        "decode": g(d, "decode"),
        "apply": g(d, "apply", "apply_inline"),
    }
    round_ms = g(d, "total") * 1e3
    return {
        "round_ms": round_ms,
        "round_ms_median": statistics.median(u["total"] for u in device_units) * 1e3,
        "loop_timer_round_ms": g(d, "t_round_s") * 1e3,
        "edge_handler_ms": handler * 1e3,
        "timed_calls_per_round": g(d, "calls") + g(e, "calls"),
        "components": [
            {"key": key, "side": side, "kind": kind, "label": label, "ms": parts[key] * 1e3}
            for key, side, kind, label in COMPONENTS
        ],
    }


def _typical(units: list[dict[str, Any]]) -> list[int]:
    """Indices of the rounds not slower than median + 5 MAD of their totals. On a shared machine a
    round another process preempted is many times slower than its peers; means would carry it."""
    totals = [u["total"] for u in units]
    med = statistics.median(totals)
    mad = statistics.median(abs(t - med) for t in totals)
    return [i for i, t in enumerate(totals) if t <= med + 5 * mad] if mad > 0 else list(range(len(units)))


def summarize_policy(
    name: str, device: dict[str, Any], edge: dict[str, Any], plain: dict[str, Any], floors: dict[str, Any], k: int
) -> dict[str, Any]:
    runs = [r for r in device["runs"][name] if not r["warmup"]]
    sessions = {r["session"] for r in runs}
    d_units = [u for u in device["units"] if u.get("session") in sessions]
    e_units = [u for u in edge["units"] if u.get("session") in sessions]
    if len(d_units) != len(e_units) or not d_units:
        raise RuntimeError(f"{name}: {len(d_units)} device rounds but {len(e_units)} edge verdicts")
    kept = _typical(d_units)
    all_rounds = len(d_units)
    totals = sorted(u["total"] * 1e3 for u in d_units)
    every_round = {
        "mean_ms": statistics.fmean(totals),
        **{f"p{q}_ms": totals[int(q / 100 * (len(totals) - 1))] for q in (10, 50, 90, 99)},
        "max_ms": totals[-1],
        # The loop's own timer over every round: what the plain run's mean (every round) compares with.
        "loop_timer_mean_ms": statistics.fmean(u["t_round_s"] for u in d_units) * 1e3,
    }
    d_units, e_units = [d_units[i] for i in kept], [e_units[i] for i in kept]
    out = decompose(d_units, e_units)
    out["rounds"] = all_rounds
    out["outlier_rounds_dropped"] = all_rounds - len(kept)
    out["every_round"] = every_round  # before dropping outliers
    # Transit split by the shared monotonic clock: the block's way up (device write starts -> edge
    # parse starts) and the verdict's way down (edge encode ends -> device read returns).
    pairs = list(zip(d_units, e_units, strict=True))
    out["uplink_ms"] = 1e3 * statistics.fmean(e["at_start"] - d["at_write"] for d, e in pairs)
    out["downlink_ms"] = 1e3 * statistics.fmean(d["at_read_end"] - e["at_end"] for d, e in pairs)
    out["tokens_per_round"] = sum(r["tokens"] for r in runs) / all_rounds
    comp = {c["key"]: c["ms"] for c in out["components"]}
    out["model_ms"] = comp["draft_forward"] + comp["model_forward"]
    out["outside_models_ms"] = out["round_ms"] - out["model_ms"]
    e_sessions = [s for s in edge["sessions"] if s["session"] in sessions and s.get("cpu_s") is not None]
    verdicts = sum(s["verdicts"] for s in e_sessions)
    out["edge_cpu_ms_per_verdict"] = 1e3 * sum(s["cpu_s"] for s in e_sessions) / verdicts if verdicts else None
    if out["edge_cpu_ms_per_verdict"] is not None:
        out["edge_cpu_outside_forward_ms"] = out["edge_cpu_ms_per_verdict"] - comp["model_forward"]
    out["device_cpu_ms_per_round"] = 1e3 * sum(r["cpu_s"] for r in runs) / all_rounds
    drafts = 0 if name == "fixed-0" else k
    floor = (floors["drafter_k_ms"] if drafts else 0.0) + floors["target_k1_ms" if drafts else "target_1_ms"]
    out["floor_ms"] = floor + floors["echo_rtt_ms"]
    out["elapsed_per_round_ms"] = 1e3 * sum(r["elapsed_s"] for r in runs) / all_rounds
    out["plain_round_ms"] = plain["round_ms"]
    out["plain_elapsed_per_round_ms"] = plain["elapsed_per_round_ms"]
    out["plain_tokens_per_s"] = plain["tokens_per_s"]
    if "edge_cpu_ms_per_token" in plain:  # the plain run's edge, by thread (`thread_cpu_s`)
        out["plain_edge_cpu_ms_per_token"] = plain["edge_cpu_ms_per_token"]
    out["plain_round_vs_floor"] = plain["round_ms"] / out["floor_ms"]
    out["round_vs_floor"] = out["round_ms"] / out["floor_ms"]
    out["instrumentation_inflation"] = every_round["loop_timer_mean_ms"] / plain["round_ms"]  # both every round
    return out


def ranked_overhead(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """Components outside the model forwards, largest first."""
    rows = [c for c in policy["components"] if c["kind"] != "model"]
    return sorted(rows, key=lambda c: -c["ms"])
