"""Device runs of `gelato-bench gsm8k`: what one run is, how its N device processes run, and what
is summed from them.

Contract. `RunSpec` is one policy configuration (label, `--policy`, extra device flags, budget, V,
pipelining). `Fleet.run(spec)` starts N `gelato-device --json --trace` processes at once (device i
gets questions i, i+N, i+2N, ... of the run: `shard_files`), each under the channel's launcher
(its network namespace, pinned to its core), counts finished questions into a progress bar as
their JSON lines arrive, and returns a `RunResult`: per-question records (with `question` = the
global index and `device`), and per-round rows (the device's `--trace` lines plus `device` and
`question`). `summarize(result)` gives the run's metrics: ratios of sums over all questions
(tokens/s per device, device J/token, mean device power), the fleet's tokens/s two ways
(`aggregate_tokens_per_s`: Σ over devices of each device's own tokens/s, which is the fleet's rate
only where the devices generated at the same time; `fleet_tokens_per_s`: all tokens ÷ the span from
the first question's start to the last one's end, read from when each record arrived, None for
results recorded before that time was kept), acceptance, mean draft length, rounds,
bytes, edge compute per token, per device the p50/p99 latency per token (each emitted token
weighs its round's wall time divided by the tokens the round emitted), and the pipelining figures
of `pipeline_stats`. `RunSpec.pipeline` is the device's `--pipeline` mode (off, local,
send-ahead); results written before it was a mode hold a bool there (True: local), which
`pipeline_mode` (and so `RunSpec`) reads as such.
"""

from __future__ import annotations

import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gelato.benchmarks.procs import child_env


def pipeline_mode(value: Any) -> str:
    """A run's pipelining mode from a summary: a mode name, or (older results) a bool or nothing."""
    if isinstance(value, str):
        return value or "off"
    return "local" if value else "off"


@dataclass(frozen=True)
class RunSpec:
    label: str
    policy: str
    family: str
    flags: tuple[str, ...] = ()
    budget: float | None = None
    v: float | None = None
    pipeline: str = "off"  # the device's --pipeline mode

    def __post_init__(self) -> None:
        object.__setattr__(self, "pipeline", pipeline_mode(self.pipeline))

    @property
    def slug(self) -> str:
        table = str.maketrans({" ": "_", "=": "", "ē": "b", "τ": "t", "λ": "l", "+": "_", ",": "_"})
        return self.label.translate(table)


@dataclass
class RunResult:
    spec: RunSpec
    records: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    loadavg: float | None = None  # 1-minute load average when the run ended (others may share the machine)


def shard_files(questions: list[dict[str, Any]], devices: int, folder: Path) -> list[Path]:
    """Device i's prompts file: questions i, i+N, ... (JSONL with `question`)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(devices):
        path = folder / f"device{d}.jsonl"
        path.write_text("".join(json.dumps({"question": q["question"]}) + "\n" for q in questions[d::devices]))
        paths.append(path)
    return paths


def load_questions(args: Any) -> list[dict[str, Any]]:
    """The run's questions (`args.data`, `args.limit`, `args.instruction`) with their gold answers;
    `args.data` becomes the file found (`--data`, else the default places)."""
    from gelato.tiny.train import gsm8k_file

    path = gsm8k_file("test", args.data)  # a one-line error (SystemExit) when missing
    args.data = path
    rows = read_questions(path, args.limit)
    from gelato.benchmarks.bench_report import gsm8k_answer

    suffix = f"\n\n{args.instruction}" if args.instruction else ""  # the same for every run and reference
    return [{"question": r["question"] + suffix, "gold": gsm8k_answer(r.get("answer", ""))} for r in rows]


class DataError(ValueError):
    """A `--data` file that is not GSM8K-shaped JSONL; the text names the file and line."""


def read_questions(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first `limit` records of a GSM8K-shaped JSONL (each an object with a "question" string;
    blank lines skipped), checked as they are read: `DataError` names the line that is not."""
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({exc})") from exc
    for n, line in enumerate(lines, 1):
        if len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f'{path}:{n}: no "question" string (GSM8K lines are {{"question": ..., "answer": ...}})')
        if not isinstance(row.get("answer", ""), str):  # scored by the number in it; none: unscored
            raise DataError(f'{path}:{n}: "answer" must be a string (the worked answer ending "#### N")')
        rows.append(row)
    return rows


def shard_index(device: int, local: int, devices: int) -> int:
    return device + local * devices


class Fleet:
    """Runs one spec on N device processes. `launcher(d)` is device d's command prefix (network
    namespace + pinning); `base` the device flags every run shares; `progress` gets `update(1)`
    per finished question."""

    def __init__(
        self,
        launcher: list[list[str]],
        base: list[str],
        shards: list[Path],
        work: Path,
        progress: Any = None,
        silence_s: float = 1800.0,
    ) -> None:
        self.launcher, self.base, self.shards, self.work = launcher, base, shards, work
        # How long the fleet may go without a device finishing a question (or exiting): a limit
        # on a hang, not on the run, which may take as long as its questions need.
        self.progress, self.silence_s = progress, silence_s

    def command(self, spec: RunSpec, d: int, trace: Path) -> list[str]:
        cmd = [*self.launcher[d], sys.executable, "-m", "gelato.device.cli", "--json", *self.base]
        cmd += ["--prompts-file", str(self.shards[d]), "--policy", spec.policy, *spec.flags]
        return [*cmd, "--trace", str(trace)]

    def run(self, spec: RunSpec) -> RunResult:
        self.work.mkdir(parents=True, exist_ok=True)
        traces = [self.work / f"{spec.slug}.device{d}.jsonl" for d in range(len(self.shards))]
        errs = [self.work / f"{spec.slug}.device{d}.stderr" for d in range(len(self.shards))]
        lines: queue.Queue[tuple[int, str] | None] = queue.Queue()
        t0 = time.perf_counter()
        procs: list[Any] = []
        try:
            for d in range(len(self.shards)):
                procs.append(self._start(self.command(spec, d, traces[d]), errs[d], d, lines))
        except BaseException:  # SIGTERM (SystemExit under `guard`) mid-start: no device outlives it
            for p in procs:
                p.kill()
                p.wait()
            raise
        records = self._collect(procs, lines, spec, t0)
        result = RunResult(spec, records=records, wall_s=time.perf_counter() - t0, loadavg=os.getloadavg()[0])
        for d, path in enumerate(traces):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                row["device"], row["question"] = d, shard_index(d, row["prompt_index"], len(self.shards))
                result.rounds.append(row)
            path.unlink()
        for e in errs:
            e.unlink(missing_ok=True)
        return result

    def _start(self, cmd: list[str], err: Path, d: int, lines: queue.Queue[tuple[int, str] | None]) -> Any:
        with open(err, "w") as f:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=child_env())

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put((d, line))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return proc

    def _collect(
        self, procs: list[Any], lines: queue.Queue[tuple[int, str] | None], spec: RunSpec, t0: float
    ) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        local = Counter[int]()
        open_streams = len(procs)
        try:
            while open_streams:
                item = lines.get(timeout=self.silence_s)
                if item is None:
                    open_streams -= 1
                    continue
                d, line = item
                if not line.startswith("{"):
                    continue
                rec = json.loads(line)
                rec["device"], rec["question"] = d, shard_index(d, local[d], len(procs))
                # When the question ended, on the fleet's clock (its start: this minus its elapsed_s).
                rec["done_at_s"] = round(time.perf_counter() - t0, 4)
                local[d] += 1
                records.append(rec)
                if self.progress is not None:
                    self.progress.update(1)
        except queue.Empty:
            raise RuntimeError(
                f"{spec.label}: no device finished a question or exited for {self.silence_s:g} s "
                f"({len(records)} questions done): a device or the edge hangs"
            ) from None
        finally:
            for p in procs:
                if p.poll() is None and open_streams:
                    p.kill()
                p.wait()
        failed = [d for d, p in enumerate(procs) if p.returncode != 0]
        if failed:
            err = (self.work / f"{spec.slug}.device{failed[0]}.stderr").read_text()[-3000:]
            raise RuntimeError(f"{spec.label}: gelato-device {failed} failed:\n{err}")
        return sorted(records, key=lambda r: r["question"])


# ---------------------------------------------------------------- metrics


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def token_latencies(rounds: list[dict[str, Any]]) -> list[float]:
    """Seconds per token, one entry per emitted token: its round's wall time / the round's tokens."""
    out: list[float] = []
    for r in rounds:
        if r["emitted"] > 0:
            out += [r["t_round_s"] / r["emitted"]] * r["emitted"]
    return out


def per_device(res: RunResult) -> list[dict[str, Any]]:
    rows = []
    for d in sorted({r["device"] for r in res.records}):
        recs = [r for r in res.records if r["device"] == d]
        lat = token_latencies([r for r in res.rounds if r["device"] == d])
        tokens, elapsed = sum(r["n_tokens"] for r in recs), sum(r.get("elapsed_s", 0.0) for r in recs)
        # Its last question by when it ended (in list order for records without the time).
        last = recs[max(range(len(recs)), key=lambda i: (recs[i].get("done_at_s", 0.0), i))]
        rows.append(
            {
                "device": d,
                "questions": len(recs),
                "tokens": tokens,
                "tokens_per_s": _ratio(tokens, elapsed),
                "latency_p50_ms": None if not lat else percentile(lat, 0.5) * 1e3,  # type: ignore[operator]
                "latency_p99_ms": None if not lat else percentile(lat, 0.99) * 1e3,  # type: ignore[operator]
                # This device's controller state after its last question.
                "q_final_j": last.get("q_deficit_j"),
                "long_run_j_per_token": last.get("long_run_j_per_token"),
            }
        )
    return rows


def answered_rounds(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds that read an answer from the edge (bytes down): an `ar-edge` round whose token
    came in the message read for an earlier round waited for nothing, and would pull a median of
    round or network times towards 0. All of them where none read one (`ar-device`)."""
    return [r for r in rounds if r.get("bytes_down", 0) > 0] or rounds


def summarize(res: RunResult) -> dict[str, Any]:
    recs, spec = res.records, res.spec
    tokens = sum(r["n_tokens"] for r in recs)
    elapsed = sum(r.get("elapsed_s", 0.0) for r in recs)
    drafted, rounds = sum(r.get("drafted", 0) for r in recs), sum(r.get("rounds", 0) for r in recs)
    joules = [r.get("energy_j") for r in recs]
    energy = None if any(j is None for j in joules) else sum(j for j in joules if j is not None)
    devs = per_device(res)
    local_only = spec.policy == "ar-device"
    q = [r["q_deficit_j"] for r in res.rounds if r.get("q_deficit_j") is not None]
    return {
        "label": spec.label,
        "policy": spec.policy,
        "family": spec.family,
        "flags": list(spec.flags),
        "budget_j_per_token": spec.budget,
        "v": spec.v,
        "pipeline": spec.pipeline,
        "questions": len(recs),
        "errors": sum(r.get("stop_reason") == "error" for r in recs),
        "tokens": tokens,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": _ratio(tokens, elapsed),
        "aggregate_tokens_per_s": sum(d["tokens_per_s"] or 0.0 for d in devs),
        "fleet_tokens_per_s": fleet_rate(recs),
        "energy_j_per_token": None if energy is None else _ratio(energy, tokens),
        "mean_power_w": None if energy is None else _ratio(energy, elapsed),
        "energy": sorted({f"{r.get('energy_source')} ({r.get('energy_kind')})" for r in recs}),
        # Of the verified blocks' drafts (pipelined runs also drafted the `wasted_tokens` thrown
        # away); none for ar-device, whose drafts no target verified (it checks its own).
        "acceptance": None if local_only else _ratio(sum(r.get("accepted", 0) for r in recs), drafted),
        "mean_draft_len": None if local_only else _ratio(drafted, rounds),
        "rounds": rounds,
        "tokens_per_round": _ratio(tokens, rounds),
        "bytes_up": sum(r.get("bytes_up", 0) for r in recs),
        "bytes_down": sum(r.get("bytes_down", 0) for r in recs),
        # Each forward's time divided among its rows (runs recorded before `edge_share_s` existed:
        # the whole batch's time for every row, which counts a batched forward once per row).
        "edge_compute_s_per_token": _ratio(
            sum(r.get("edge_share_s", r.get("edge_compute_s", 0.0)) for r in recs), tokens
        ),
        "stop_reasons": dict(Counter(r.get("stop_reason") or "-" for r in res.rounds).most_common()),
        "k_hist": {str(k): v for k, v in sorted(Counter(r["k"] for r in res.rounds).items())},
        # One device's controller state: with several, each device's is in `per_device`.
        "q_final_j": devs[0]["q_final_j"] if len(devs) == 1 else None,
        "q_max_j": max(q) if q else None,
        "long_run_j_per_token": devs[0]["long_run_j_per_token"] if len(devs) == 1 else None,
        "t_net_median_ms": (
            statistics.median(r["t_net_s"] for r in answered_rounds(res.rounds)) * 1e3 if res.rounds else None
        ),
        **pipeline_stats(res.rounds, tokens),
        "per_device": devs,
        "wall_s": round(res.wall_s, 1),
        "loadavg_1min_after": res.loadavg,
    }


def fleet_rate(recs: list[dict[str, Any]]) -> float | None:
    """All tokens ÷ (last question's end − first question's start), on the fleet's clock; None
    when a record has no `done_at_s` (results recorded before it was kept)."""
    if not recs or any("done_at_s" not in r for r in recs):
        return None
    start = min(r["done_at_s"] - r.get("elapsed_s", 0.0) for r in recs)
    return _ratio(sum(r["n_tokens"] for r in recs), max(r["done_at_s"] for r in recs) - start)


def _wasted(r: dict[str, Any]) -> int:
    """Drafted tokens a round threw away: send-ahead's count (stale and unsent blocks, a missed
    successor included), or else a missed local pre-draft (those rounds carry no count)."""
    missed = 0 if r.get("predraft_hit") else r.get("predrafted", 0)
    return max(r.get("wasted_tokens", 0), missed)


def pipeline_stats(rounds: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Pipelining from the per-round rows (None where the run had none of it):
    - `sent_ahead`: blocks with drafts (or a guess) sent before their parent's verdict, verified
      or stale; `ahead_verified` of them verified, `stale_blocks` answered stale; `sent_empty`:
      empty blocks sent ahead (`follow`: the target's next token), verified or stale, counted apart
      (runs recorded before 2026-12-06 counted stale empty blocks in `stale_blocks`);
    - `ahead_hit_rate`: `ahead_verified` ÷ `sent_ahead` (empty blocks not counted);
    - `predraft_hit_rate`: of the rounds with something drafted after them before their verdict
      (a local pre-draft, or a successor in flight), those it started (full accept, guess right);
    - `wasted_tokens_per_token`: drafted tokens thrown away per output token (a local hit's
      pre-drafted tokens that the next block did not use are not counted: the trace has no field);
    - `wasted_j_per_token`: their drafting energy per output token — the device's estimate
      (`wasted_j`) for send-ahead rounds; for local pre-draft misses, which carry none, the tokens
      × the run's measured drafting J per drafted token (Σ e_draft_j ÷ Σ (k − carried)), None
      when the run has no such measurement."""
    empty = sum(bool(r.get("sent_ahead") and r.get("follow")) for r in rounds)
    verified = sum(bool(r.get("sent_ahead")) for r in rounds) - empty
    stale = sum(r.get("stale_blocks", 0) for r in rounds)
    pre = [r for r in rounds if r.get("predrafted")]
    metered = [r for r in rounds if _finite(r.get("e_draft_j")) and r["k"] - r.get("carried", 0) > 0]
    forwards = sum(r["k"] - r.get("carried", 0) for r in metered)
    j_per_draft = sum(r["e_draft_j"] for r in metered) / forwards if forwards else None
    wasted = 0
    wasted_j: float | None = 0.0
    for r in rounds:
        w = _wasted(r)
        wasted += w
        if not w or wasted_j is None:
            continue
        if r.get("wasted_tokens", 0) >= w:
            wasted_j += r.get("wasted_j", 0.0)
        else:
            wasted_j = None if j_per_draft is None else wasted_j + w * j_per_draft
    return {
        "sent_ahead": verified + stale,
        "ahead_verified": verified,
        "stale_blocks": stale,
        "sent_empty": empty + sum(r.get("stale_empty", 0) for r in rounds),
        "ahead_hit_rate": _ratio(verified, verified + stale),
        "predraft_rounds": len(pre),
        "predraft_hit_rate": _ratio(sum(bool(r.get("predraft_hit")) for r in pre), len(pre)),
        "wasted_tokens_per_token": _ratio(wasted, tokens),
        "wasted_j_per_token": None if wasted_j is None else _ratio(wasted_j, tokens),
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def token_ids(res: RunResult) -> dict[int, list[int]]:
    return {r["question"]: r["token_ids"] for r in res.records}
