"""Part (a) of `gelato.benchmarks.controller_overhead`: the controller's CPU time inside real rounds.

Contract: `measure_rounds(drafter, target, policy, prompts, rounds, ...)` runs greedy generations over
`prompts` (cycled) until at least `rounds` rounds, with one fresh policy learning across them all, and
returns `summarize_rounds`' dict: per-round means of the parts (`PARTS`, summed as the controller's
work, and `SUB_PARTS`, inside them), the round's CPU, network and wall time, and the fractions.
The rounds go through the device's own round loop (`gelato.device.generate.speculative_generate`)
verified in process by `gelato.edge.verifier.TargetSession`. `TimedPolicy` forwards to the real
policy and times `decide`, the per-token `gate` calls and `observe` (with the calibrator's
`observe_block` inside it shown separately); the drafter's own entropy calls (`entropy_nats` /
`entropy_of_probs` in `gelato.device.drafter`) are timed where the drafter makes them
(`timing_entropy`, restored after). Neither changes what the round loop computes. Controller time =
decide + gate + observe + entropy, in this thread's CPU time (`cpu`; on a shared machine,
descheduling shows up as 4-8 ms stalls inside single calls: not the controller's work). Round time =
the thread's CPU time from `decide` to the end of `observe` (drafting, the in-process verify standing
in for the edge, the controller) plus the network wait: the round of an unloaded device. Fraction =
Σ controller / Σ round (ratio of sums; also the 95th percentile of the per-round fraction, and
Σ controller over Σ wall-clock round). `rtt_s` adds that much sleep to each verify (`with_rtt`:
blocking, so the wait is real idle time, after which the CPU runs colder, and the policies'
estimators see it as network time). Timings include the timers' own cost (`timer_ns`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gelato.controller import Decision, EntropyCalibrator
from gelato.device.drafter import Drafter
from gelato.device.generate import Exchange, Limits, Verify, local_verifier, speculative_generate
from gelato.device.policy import Gate, Policy, PolicyOptions, parse_policy
from gelato.edge.verifier import TargetSession
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams, SparseDist, Telemetry

PARTS = ("decide", "gate", "observe", "entropy")  # summed: the controller's work in a round
SUB_PARTS = ("calibrator",)  # inside `observe`, shown separately, not added again

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
