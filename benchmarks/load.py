"""Reliability under load and faults, against real `gelato-edge` processes on loopback.

Contract: `python -m gelato.benchmarks.load [--sessions 64] [--waves 2] [--kills 200] [--device-kills 3]
[--fuzz-cases 320] [--target M] [--drafter M] [--out PATH]` runs these phases on CPU (float32,
each edge on one torch thread) and exits 1 if any check failed (0 otherwise); with `--out` it
writes PATH.json and PATH.md, with the command and `gelato.benchmarks.procs.machine()`.
- load: `--waves` waves of `--sessions` well-formed sessions, all open at once (greedy with draft
  lengths 0..8; every 8th one sampling with a fixed seed; drafts from the target itself with one
  made wrong per block, `load_drafts.TargetDrafts`, so that acceptance and rollback run), one
  connection each; the wave must have all of them open at once, batched, with drafts both accepted
  and rejected. Every session's verdicts must equal its solo run (`reference`: the same blocks verified by an in-process
  `gelato.edge.verifier.TargetSession`); after each wave the edge must hold no session and no KV
  (`Info`, polled up to `IDLE_WAIT_S`), and its idle RSS after the last wave must be within
  `RSS_TOLERANCE_MIB` of the one after the first (with `FIXED_MALLOC`; the same waves against an
  edge with glibc's default allocator are recorded against a tolerance that includes the pool).
- fuzz: the protocol fuzzer's cases (`gelato.benchmarks.load_fuzz`, its fixed seed, as the tests) and
  `bad_sampling_cases`, each with its precise status; void fuzzer cases are counted apart.
- kills: `--kills` sessions killed mid-round: in-process grpc.aio streams cancelled (or their
  whole connection closed) at every point of a session (`KILL_MODES`), and `--device-kills` real
  `gelato-device` processes SIGKILLed while generating, while the `WITNESSES` (greedy and
  sampling) run again and again; every witness run equals its solo run, before and after, and
  then sessions and KV are back to zero and the edge is still SERVING.
- sigterm: an edge SIGTERMed with finishing, slowly generating and silent sessions: every stream
  ends OK (done within the grace period) or UNAVAILABLE with a message, a device arriving then is
  refused UNAVAILABLE, nothing hangs, and the edge exits 0 within its grace period (`EDGE_GRACE_S`,
  edge/cli.py) plus the interpreter's teardown (`EXIT_SLACK_S`).
- stall: an edge with `--idle-timeout-s 1`: clients that go silent (before open, after open,
  mid-generation) end DEADLINE_EXCEEDED after 1 s of silence, a client that stops reading the
  edge's answers mid-`Generate` has its session freed while it still reads nothing and ends
  DEADLINE_EXCEEDED, while a slow but live session is untouched and exact; sessions return to zero.
Each phase records its cases, failures, wall time, the edge's peak and idle RSS (psutil) and
`Info`'s sessions/KV after it. The reliability tests (`tests/reliability/test_load.py`,
`test_faults.py`) run the same functions at a smaller scale, with the same deterministic session
driver (`load_streams`) and fuzzer (`load_fuzz`); the benchmark runs from an installed wheel too.

The phases live in sibling modules: `load_driver` (the session driver, `reference`, the edge's
state and `Monitor`), `load_traffic` (load and fuzz) and `load_faults` (kills, sigterm and stall).
This module is the CLI: it starts an edge per phase group, runs the phases in order, writes the
report, and re-exports the phases and the names this contract cites.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gelato.benchmarks.load_drafts import Memo, TargetDrafts
from gelato.benchmarks.load_driver import IDLE_WAIT_S, reference, rss_mib, wait_idle
from gelato.benchmarks.load_faults import (
    EDGE_GRACE_S,
    EXIT_SLACK_S,
    KILL_MODES,
    WITNESSES,
    kills_phase,
    sigterm_phase,
    stall_phase,
)
from gelato.benchmarks.load_streams import Spec
from gelato.benchmarks.load_traffic import (
    FIXED_MALLOC,
    RSS_TOLERANCE_MIB,
    bad_sampling_cases,
    fuzz_phase,
    load_phase,
    load_specs,
)
from gelato.benchmarks.procs import Edge, exit_on_signals, machine, start_edge
from gelato.cli_common import positive_int
from gelato.models import default_model_path, load_model

__all__ = [
    "EDGE_GRACE_S",
    "EXIT_SLACK_S",
    "FIXED_MALLOC",
    "IDLE_WAIT_S",
    "KILL_MODES",
    "RSS_TOLERANCE_MIB",
    "WITNESSES",
    "bad_sampling_cases",
    "edge_args",
    "fuzz_phase",
    "kills_phase",
    "load_phase",
    "load_specs",
    "main",
    "markdown",
    "parse_args",
    "reference",
    "run_phases",
    "sigterm_phase",
    "stall_phase",
    "with_edge",
]


def edge_args(target: str, *extra: str) -> list[str]:
    return ["--target", target, "--threads", "1", "--dtype", "float32", "--device", "cpu", *extra]


def with_edge(args: list[str], run: Callable[[Edge], Coroutine[Any, Any, dict]], env: dict | None = None) -> dict:
    """Start an edge (with `env` added to its environment), run one phase against it, then stop
    it and record how long stopping took (a phase may have stopped it itself)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        edge = start_edge(args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    try:
        out = asyncio.run(run(edge))
    finally:
        t0 = time.perf_counter()
        code = edge.stop()
        if code != 0:
            print(f"gelato-edge exited {code}:\n{edge.output()[-2000:]}", file=sys.stderr)
    return {**out, "edge_stop_s": round(time.perf_counter() - t0, 3)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gelato.benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=default_model_path("target"))
    p.add_argument("--drafter", default=default_model_path("drafter"))
    p.add_argument("--sessions", type=positive_int, default=64, help="concurrent sessions per load wave")
    p.add_argument(
        "--waves", type=positive_int, default=2, help="load waves (>= 1; the RSS check compares the first and last)"
    )
    p.add_argument("--kills", type=int, default=200, help="sessions killed mid-round, device processes included")
    p.add_argument("--device-kills", type=int, default=3, help="of them, real gelato-device processes SIGKILLed")
    p.add_argument("--fuzz-cases", type=int, default=320)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def run_phases(args: argparse.Namespace) -> dict[str, dict]:
    target = load_model(args.target, "target", "float32", "cpu")
    fp, vocab = target.fingerprint, target.vocab_size
    make = Memo(TargetDrafts(target))  # drafts the target takes some of: acceptance and rollback run
    witnesses = [(w, reference(target, w, make)) for w in WITNESSES]
    live_spec = Spec((21, 22, 23), 2, 6)
    phases: dict[str, dict] = {}

    async def main_edge(edge: Edge) -> dict:
        pid = edge.proc.pid
        phases["start"] = {"idle_rss_mib": rss_mib(pid), **(await wait_idle(edge.address))[0], "failures": []}
        phases["load"] = await load_phase(edge.address, pid, target, args.sessions, args.waves)
        phases["fuzz"] = await asyncio.to_thread(fuzz_phase, edge.address, pid, args.fuzz_cases)
        kills = (args.kills, args.device_kills, args.drafter, witnesses, make)
        return await kills_phase(edge.address, pid, fp, vocab, *kills)

    def default_malloc(edge: Edge) -> Coroutine[Any, Any, dict]:
        return load_phase(edge.address, edge.proc.pid, target, args.sessions, args.waves, fixed_malloc=False)

    sessions = ["--max-sessions", str(max(64, args.sessions))]
    phases["kills"] = with_edge(edge_args(args.target, *sessions), main_edge, FIXED_MALLOC)
    phases["load (glibc default malloc)"] = with_edge(edge_args(args.target, *sessions), default_malloc)
    phases["sigterm"] = with_edge(edge_args(args.target), lambda e: sigterm_phase(e, fp, vocab))
    live = (live_spec, reference(target, live_spec))
    stall_args = edge_args(args.target, "--idle-timeout-s", "1")
    phases["stall"] = with_edge(stall_args, lambda e: stall_phase(e.address, e.proc.pid, fp, vocab, 1.0, live))
    order = ["start", "load", "load (glibc default malloc)", "fuzz", "kills", "sigterm", "stall"]
    return {k: phases[k] for k in order}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with exit_on_signals():  # each phase's edge is stopped on SIGTERM too
        phases = run_phases(args)
    record = {
        "command": "python -m gelato.benchmarks.load " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "target": args.target,
        "drafter": args.drafter,
        "wall_s": round(time.perf_counter() - t0, 1),
        "failures": sum(len(ph["failures"]) for ph in phases.values()),
        "phases": phases,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 1 if record["failures"] else 0


def markdown(r: dict) -> str:
    ph = r["phases"]
    lines = [
        f"# Reliability under load and faults — {r['machine']}",
        "",
        f"Command: `{r['command']}` (wall {r['wall_s']} s, {r['failures']} failures). "
        f"Target `{r['target']}`, drafter `{r['drafter']}`, float32, each edge on one torch thread.",
        "",
        "| phase | cases | failures | wall s | peak RSS MiB | idle RSS MiB | after: sessions / KV in use / pool B |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, case, p in _rows(ph):
        after = p.get("after")
        state = f"{after['active_sessions']} / {after['kv_bytes_in_use']} / {after['kv_pool_bytes']}" if after else ""
        lines.append(
            f"| {name} | {case} | {len(p['failures'])} | {p.get('wall_s', '')} | {p.get('peak_rss_mib', '')} "
            f"| {p.get('idle_rss_mib', '')} | {state} |"
        )
    lines += ["", *_notes(ph)]
    return "\n".join(lines) + "\n"


def _rows(ph: dict) -> list[tuple[str, str, dict]]:
    rows = [("start", "edge up, before any session", ph["start"])]
    for phase in ("load", "load (glibc default malloc)"):
        for i, w in enumerate(ph[phase]["waves"]):
            case = f"{w['sessions']} sessions ({w['sampling_sessions']} sampling), {w['rounds']} rounds"
            rows.append((f"{phase} wave {i + 1}", case, w))
    k = ph["kills"]
    fuzz = ph["fuzz"]
    rows.append(("fuzz", f"{fuzz['cases']} cases ({len(fuzz['void_fuzzer_cases'])} void)", fuzz))
    rows.append(("kills", f"{k['killed']} killed ({len(k['device_processes'])} device processes)", k))
    rows.append(("sigterm", f"{ph['sigterm']['sessions']} sessions + 1 arriving", ph["sigterm"]))
    rows.append(("stall", f"{len(ph['stall']['stalled'])} silent + 1 not reading + 1 live", ph["stall"]))
    return rows


def _accepted(w: dict) -> str:
    if "drafted" not in w:  # runs before it was recorded
        return f"{w['accepted']} drafts accepted"
    return f"{w['accepted']} of {w['drafted']} drafts accepted ({w['accepted'] / max(w['drafted'], 1):.0%})"


def _notes(ph: dict) -> list[str]:
    load, default, k, sig, st = ph["load"], ph["load (glibc default malloc)"], ph["kills"], ph["sigterm"], ph["stall"]
    w, void = load["waves"][0], ph["fuzz"]["void_fuzzer_cases"]
    # Said only as measured: a wave's failures are its sessions that ended in error or whose
    # verdicts differ from their solo run, and the wave's own checks that failed (all open at
    # once, checked from 8 sessions on; batched; some drafts accepted and some rejected).
    failures = [f for x in load["waves"] + default["waves"] for f in x["failures"]]
    bad_sessions = sum("session" in f for f in failures)
    at_once = w["sessions"] >= 8 and w["peak_active_sessions"] >= w["sessions"]
    sessions = (
        f"all {w['sessions']} sessions open at once"
        if at_once and not failures
        else f"{w['sessions']} sessions started together"
    )
    parts = []
    if bad_sessions:
        parts.append(f"sessions that ended in error or differed from their solo run, over the waves: {bad_sessions} ")
    if len(failures) > bad_sessions:  # a check of a wave itself, not of one session
        parts.append(f"waves' checks that failed: {len(failures) - bad_sessions} ")
    verdicts = "; ".join(f"{part}(the JSON's failures)" for part in parts) or "every verdict equal to the solo run"
    return [
        f"- Load: {sessions} (peak Info.active_sessions {w['peak_active_sessions']}), "
        f"batches of up to {w['max_batch_rows']} rows, peak KV pool {w['peak_kv_pool_bytes'] / 2**20:.1f} MiB, "
        f"{_accepted(w)}; "
        f"{verdicts}. Idle RSS after the last wave minus after the first: "
        f"{load['rss_growth_after_first_wave_mib']} MiB with `{load['malloc']}` (tolerance "
        f"{load['rss_tolerance_mib']} MiB), {default['rss_growth_after_first_wave_mib']} MiB with glibc's default "
        f"(tolerance {default['rss_tolerance_mib']} MiB: the peak pool may stay in the heap).",
        f"- Kills: {k['by_mode']} in-process, concurrently with {k['witness_runs']} runs of {len(WITNESSES)} "
        f"well-formed sessions ({k['witness_mismatches']} differing from their solo runs); device processes SIGKILLed "
        f"{[d['delay_s'] for d in k['device_processes']]} s after their first rounds. Edge idle "
        f"{k['seconds_to_idle']} s after, SERVING: {k['serving']}.",
        f"- Fuzz: {len(void)} of the fuzzer's open.temperature/open.top_p cases are void (they open with valid "
        f"sampling parameters: {dict(Counter(v['code'] for v in void))}); `bad_sampling_cases` sends those values.",
        f"- SIGTERM with {sig['active_at_sigterm']} open sessions: streams ended "
        f"{dict(Counter((e['kind'], e['code']) for e in sig['streams']))}, the last "
        f"{sig['last_stream_end_after_s']} s after the signal; a device arriving then got "
        f"{sig['late_open']['code']}; the edge exited {sig['edge_exit_code']} after {sig['edge_exit_after_s']} s "
        f"(grace period {sig['grace_s']} s; an idle edge takes {st['edge_stop_s']} s to stop).",
        f"- Stall (idle timeout {st['idle_timeout_s']} s): "
        + ", ".join(f"{s['kind']} ended {s['code']} after {s['silent_s']} s of silence" for s in st["stalled"])
        + f"; a client that stopped reading during `Generate` had its session freed while still not reading "
        f"(Info then: {st['unread']['while_unread']}), read the {st['unread']['verdicts_read']} verdicts written "
        f"before the stall and ended {st['unread']['code']}"
        + f"; the live session (pauses of {0.4 * st['idle_timeout_s']:g} s) ended {st['live']['code']}.",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
