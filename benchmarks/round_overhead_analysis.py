"""The decomposition of a round in the round-overhead benchmark (`gelato.benchmarks.round_overhead`).

Contract: `COMPONENTS` lists the disjoint parts of a round, in round order, as (key, side, kind,
label); `SUGGESTIONS` what could cut each part. `decompose(device_units, edge_units)` gives the
mean ms per round of every component (they sum to the round) from matched rounds;
`summarize_policy(name, device, edge, plain, floors, k)` one policy's figures (outlier rounds
dropped, transit split by the shared clock, CPU per verdict and round, floor and ratios);
`ranked_overhead(policy)` the components outside the model forwards, largest first.
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

SUGGESTIONS = {
    "transit": "compare the echo variants (below the table): what time-limited reads and protobuf add to a "
    "back-to-back echo is small next to what an idle gap adds. Each side's event loop sleeps in epoll "
    "while the other computes, and waking it (and, on a VM, its idle vCPU) is most of this part: poll "
    "briefly before sleeping when a reply is due soon (the edge knows its forward's length, the device "
    "its round's), and avoid the async-generator handler's extra turn per message (`context.write`).",
    "hops": "one executor round trip per drafting round (verdict apply and empty blocks run on the loop's "
    "thread): a wake-up of the sleeping drafter thread plus a self-pipe wake-up of the loop; drafting on the "
    "loop thread when nothing else (pre-drafting, other generations) needs the loop meanwhile would remove it.",
    "queue": "asyncio.Queue put/get, the batcher task's wake-up, `run_in_executor` to the sleeping model "
    "thread and the loop's wake-up back (self-pipe) for the future: with one open session (or an empty "
    "queue and nothing in flight) hand the row to the model thread at once, keep the model thread "
    "polling briefly before it sleeps, and resolve a batch's futures with one `call_soon_threadsafe`.",
    "loop": "per round `dataclasses.replace` of Telemetry twice, meter reads, policy observe/decide: build "
    "Telemetry once, read the meter once per round edge.",
    "pool": "about fifteen small torch calls per forward outside the model, 5-25 µs each on this CPU: "
    "`ends.max()` on a tensor, three `torch.tensor`, two `arange`, two `zeros`, `minimum`, `masked_fill_` for "
    "the [B, n, kv_len] mask, index tensors for the cache object, `inference_mode` entries, the module call: "
    "keep lengths and kv_len as Python ints, skip the mask for single-query rows (one query sees every key) "
    "and cache it per shape otherwise, reuse preallocated id/position/index tensors.",
    "checks": "`TargetSession.check` runs twice per block (event loop and model thread), each re-validating "
    "ids already validated by `decode_block` (params.validate, check_block): validate once at decode, keep "
    "only the round/length checks.",
    "decode_block": "a Python tuple of ints and a range scan per block: unavoidable in size, but it need not be "
    "repeated by `check`.",
    "parse": "the service takes raw bytes and parses them itself (for precise INVALID_ARGUMENT): one parse, "
    "unavoidable; could reuse a message object (`ParseFromString` into a preallocated one).",
    "encode_verdict": "two message objects per verdict (EdgeMessage + Verdict): cheap; could reuse one.",
    "handler_other": "Verdict dataclass, `_verify`/`_verify_block` awaits and exception frames: flatten.",
    "model_thread_other": "per-batch duplicate-session scan, outcome dict keyed by id(): small.",
    "draft_other": "per token: `torch.tensor([ids])`, an `inference_mode` entry, the module call, the logits "
    "slice and `.float()` (KVSequence.forward), `[-1]`, argmax to int: keep a preallocated input tensor, ask "
    "the model for the last position's logits only (`logits_to_keep=1`), one inference-mode scope per block.",
    "entropy": "log_softmax + exp + multiply + sum over the vocabulary per draft: skip it when the policy does "
    "not gate on entropy (fixed-K), or fuse.",
    "encode": "a SparseDist per token when sampling; greedy: one message, cheap.",
    "decode": "one Verdict dataclass: cheap.",
    "apply": "`set_tail` + `DynamicCache.crop` per layer: small.",
    "accept": "argmax over K+1 rows + `.tolist()` + set_tail: small.",
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
    out["instrumentation_inflation"] = out["loop_timer_round_ms"] / plain["round_ms"]
    return out


def ranked_overhead(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """Components outside the model forwards, largest first."""
    rows = [c for c in policy["components"] if c["kind"] != "model"]
    return sorted(rows, key=lambda c: -c["ms"])
