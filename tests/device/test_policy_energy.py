"""What the round loop charges: every joule of a generation reaches the deficit queue (rounds and
what lies outside them, a round or a whole generation the meter missed), a constant power reads the
same drafting and waiting, and a batched forward's edge time is shared among its rows."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import pytest

from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.generate import Exchange, GenerationResult, Limits, local_verifier, speculative_generate
from gelato.device.policy import Policy, PolicyOptions, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, encode_prompt
from gelato.power import open_meter, radio_profile
from gelato.types import DraftBlock, SamplingParams
from tests.device.meters import OneWatt


def test_queue_is_charged_the_whole_generation(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """Every joule of the generation reaches the deficit queue: the rounds' and what lies outside
    them (prompt prefill, open/close bytes, the radio's tail)."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples.")
    session = TargetSession("s", target, SamplingParams(), prompt)
    session.prefill()
    policy = parse_policy("gelato", PolicyOptions(budget_j_per_token=1e-3))
    acct = EnergyAccountant(open_meter("cpu-model", "phone"), radio_profile("wifi"))
    limits = Limits(20, target.context_limit, 32, target.eos_token_ids)
    res = asyncio.run(
        speculative_generate(
            Drafter(drafter_model, SamplingParams()), local_verifier(session), policy, prompt, limits, acct, None
        )
    )
    queue = policy.controller.queue
    assert queue is not None and res.stats.energy_j > sum(t.e_j for t in res.stats.rounds_log) > 0
    assert queue.energy_j == pytest.approx(res.stats.energy_j, rel=1e-9)
    assert queue.tokens == len(res.token_ids)
    # Every round's trace carries the objective's view; a budget this far below any K's cost puts
    # it over budget once the queue holds a backlog (not in the first round: Q = 0 there).
    log = res.stats.rounds_log
    assert all(math.isfinite(t.j_per_token_model) and t.j_per_token_model > 1e-3 for t in log)
    assert not log[0].over_budget and any(t.over_budget for t in log[1:])


class _OneBadRead(OneWatt):
    """1 W, but read number `bad` fails (NaN), as a sensor read that failed for a second does."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.reads, self.bad = 0, bad

    def joules_at(self, now: float) -> float:
        self.reads += 1
        return math.nan if self.reads == self.bad else super().joules_at(now)


def test_a_round_the_meter_missed_is_charged_with_the_generation(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """A round whose reading failed (NaN energy) is left out of the queue, its tokens too; the
    generation's own readings are fine, so its total is measured and the queue still holds all of
    it: the missed round's energy and tokens come in with what lies outside the rounds (once a
    single NaN round made that remainder NaN and none of it was charged)."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples.")
    session = TargetSession("s", target, SamplingParams(), prompt)
    session.prefill()
    policy = parse_policy("fixed-2", PolicyOptions(budget_j_per_token=1e-3))
    acct = EnergyAccountant(_OneBadRead(bad=7), radio_profile("wifi"))
    limits = Limits(20, target.context_limit, 32, target.eos_token_ids)
    res = asyncio.run(
        speculative_generate(
            Drafter(drafter_model, SamplingParams()), local_verifier(session), policy, prompt, limits, acct, None
        )
    )
    queue = policy.controller.queue
    missed = [t for t in res.stats.rounds_log if math.isnan(t.e_j)]
    assert queue is not None and len(missed) == 1 and queue.unmeasured_rounds == 1
    assert math.isfinite(res.stats.energy_j)
    assert queue.energy_j == pytest.approx(res.stats.energy_j, rel=1e-9)
    assert queue.tokens == len(res.token_ids)


def test_a_generation_the_meter_missed_still_charges_its_radio_joules(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """The generation's last reading fails: its total is unknown (NaN), but the radio's joules
    outside its measured rounds (its tail, the connected state between rounds, the open's bytes)
    are modelled, known, and go into the deficit queue (the NaN remainder once took them with it:
    the queue got none of a tail, 12.3 J on LTE)."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples.")
    limits = Limits(20, target.context_limit, 32, target.eos_token_ids)

    def run(meter: _OneBadRead) -> tuple[GenerationResult, Policy]:
        session = TargetSession("s", target, SamplingParams(), prompt)
        session.prefill()
        policy = parse_policy("fixed-2", PolicyOptions(budget_j_per_token=1e-3))
        acct = EnergyAccountant(meter, radio_profile("wifi"))
        drafter = Drafter(drafter_model, SamplingParams())
        res = asyncio.run(speculative_generate(drafter, local_verifier(session), policy, prompt, limits, acct, None))
        return res, policy

    counted = _OneBadRead(bad=0)  # never fails: counts the generation's reads
    run(counted)
    res, policy = run(_OneBadRead(bad=counted.reads))  # the same generation, its last read failing
    queue = policy.controller.queue
    log = res.stats.rounds_log
    assert math.isnan(res.stats.energy_j) and all(math.isfinite(t.e_j) for t in log)
    assert queue is not None and queue.tokens == sum(t.emitted for t in log)
    outside_j = res.stats.radio_j - sum(t.e_radio_j for t in log)
    wifi = radio_profile("wifi")
    assert wifi is not None and outside_j > wifi.tail_energy_j() * 0.99  # the tail at least
    assert queue.energy_j == pytest.approx(sum(t.e_j for t in log) + outside_j, rel=1e-9)


class _Unreadable(OneWatt):
    """A meter that stopped answering (a failed sensor): every read is NaN."""

    def joules_at(self, now: float) -> float:
        return math.nan


def test_a_meter_that_stays_unreadable_charges_only_the_radio_outside_the_rounds(
    target: LoadedModel, drafter_model: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Every round unmeasured: each stays out of the queue whole, its radio joules too (they were
    charged without the round's tokens, so Q grew by every round's radio and never drained); the
    radio outside the rounds (tail, gaps, open) is still charged, and the run warns once."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples.")
    limits = Limits(20, target.context_limit, 32, target.eos_token_ids)
    policy = parse_policy("fixed-2", PolicyOptions(budget_j_per_token=1e-3))
    acct = EnergyAccountant(_Unreadable(), radio_profile("lte"))
    outside_j = 0.0
    for _ in range(2):
        session = TargetSession("s", target, SamplingParams(), prompt)
        session.prefill()
        drafter = Drafter(drafter_model, SamplingParams())
        res = asyncio.run(speculative_generate(drafter, local_verifier(session), policy, prompt, limits, acct, None))
        log = res.stats.rounds_log
        assert math.isnan(res.stats.energy_j) and all(math.isnan(t.e_j) for t in log)
        rounds_radio_j = sum(t.e_radio_j for t in log)
        assert rounds_radio_j > 0
        outside_j += res.stats.radio_j - rounds_radio_j
    queue = policy.controller.queue
    assert queue is not None and queue.tokens == 0 and queue.unmeasured_rounds > 0
    assert queue.energy_j == pytest.approx(outside_j, rel=1e-9)
    warned = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warned) == 1 and "energy budget" in warned[0].getMessage()


@pytest.mark.parametrize("name", ["fixed-1", "fixed-4"])
def test_a_constant_power_reads_as_the_same_power_drafting_and_waiting(name: str, target: LoadedModel) -> None:
    """At 1 W whatever the device does, the measured split gives 1 W drafting and 1 W waiting: the
    drafting reading covers the drafting and its thread hops, and its energy is divided by that
    interval (divided by the drafting alone, it read 1.04-1.09 W drafting and 0.95 W waiting,
    a premium for drafting that pre-drafts and send-ahead waste are priced with)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.device.meters import OneWatt

    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and eats 3. How many are left?")
    session = TargetSession("s", target, SamplingParams(), prompt)
    session.prefill()
    policy = parse_policy(name, PolicyOptions(budget_j_per_token=1.0))
    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)

    async def run() -> None:
        with ThreadPoolExecutor(1) as pool:  # drafting on a thread, as the client drafts
            loop = asyncio.get_running_loop()

            async def offload(fn: object, *args: object) -> object:
                return await loop.run_in_executor(pool, fn, *args)  # type: ignore[arg-type]

            acct = EnergyAccountant(OneWatt(), None)
            drafter = Drafter(target, SamplingParams())
            await speculative_generate(drafter, local_verifier(session), policy, prompt, limits, acct, offload=offload)

    asyncio.run(run())
    model = policy.controller.cost.model()
    assert model.p_draft_w == pytest.approx(1.0, rel=0.01) and model.p_wait_w == pytest.approx(1.0, rel=0.01)


def test_a_batched_forwards_time_is_shared_among_its_rows(target: LoadedModel) -> None:
    """A verdict's compute_ms is its whole batched forward's; the generation's share of the edge
    (`edge_share_ms`, the bench's "edge ms/token") divides each by its batch's rows. Summing
    compute_ms alone charged 8 devices batched together each the whole forward: an edge pinned
    to one core at 4.5 CPU-seconds per second. (Both loops count a round in `end_round`.)"""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
    session = TargetSession("s", target, SamplingParams(), prompt)
    session.prefill()
    verify_now = local_verifier(session)
    pattern = [1, 4, 3, 2] * 10
    rows = iter(pattern)

    async def batched(block: DraftBlock) -> Exchange:
        ex = await verify_now(block)
        return replace(ex, verdict=replace(ex.verdict, compute_ms=6.0, batch_rows=next(rows)))

    policy = parse_policy("fixed-2", PolicyOptions())
    limits = Limits(12, target.context_limit, 32, ())
    res = asyncio.run(speculative_generate(Drafter(target, SamplingParams()), batched, policy, prompt, limits))
    n = res.stats.rounds
    assert n >= 3 and res.stats.edge_compute_ms == pytest.approx(6.0 * n)
    assert res.stats.edge_share_ms == pytest.approx(sum(6.0 / r for r in pattern[:n]))
