"""What `EdgeClient.generate` charges over session streams answered in process (`_Stream`), with opens
that wait or fail and failovers: the energy of every open's wait, the radio's tail once per generation
and the tails that really happen between prompts and during a failover wait, the byte totals that
crossed, and the deficit queue charged once with the energy of failed opens."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest

from gelato.device.client_errors import EdgeError, FailedOpens
from gelato.device.energy import EnergyAccountant, wire_bytes
from gelato.device.generate import GenerationResult
from gelato.device.policy import Policy, PolicyOptions, parse_policy
from gelato.models import LoadedModel
from gelato.power import NullMeter, radio_profile
from gelato.types import Telemetry
from gelato.v1 import gelato_pb2 as pb
from tests.device.meters import OneWatt
from tests.device.test_client_stream import _generate, _Stream


def test_the_wait_for_each_open_is_the_generations_energy(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """The device spends energy while the edge opens the session (prefills the prompt), and again
    while a failover reconnects and re-opens: the generation's energy covers its whole span, as
    its `elapsed_s` does (once both opens' waits were in no round and no total)."""
    for streams in (
        [_Stream(target, open_s=0.3)],
        [_Stream(target, cut_after=2, open_s=0.3), _Stream(target, open_s=0.3)],
    ):
        acct = EnergyAccountant(OneWatt(), None)
        res = _generate(target, drafter_model, streams, failovers=1, acct=acct)
        assert res.error == "" and res.failovers == len(streams) - 1
        opens_s = 0.3 * len(streams)
        assert opens_s < res.stats.energy_j <= res.elapsed_s  # 1 W: joules are seconds
        assert res.stats.energy_j == pytest.approx(res.elapsed_s, abs=0.05)
        assert res.stats.energy_j - sum(t.e_j for t in res.stats.rounds_log) > opens_s  # outside any round
    # A re-open that fails after 0.3 s: the generation ends with an error, its energy still the span's.
    acct = EnergyAccountant(OneWatt(), None)
    streams = [_Stream(target, cut_after=2, open_s=0.3), _Stream(target, open_s=0.3, open_fails=True)]
    res = _generate(target, drafter_model, streams, failovers=1, acct=acct)
    assert "re-opening the session failed" in res.error
    assert 0.6 < res.stats.energy_j <= res.elapsed_s and res.stats.energy_j == pytest.approx(res.elapsed_s, abs=0.05)


def test_a_failover_charges_the_radio_tail_once(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """The re-open follows the lost session at once, so the radio stays connected: one tail per
    generation, in its totals (once each session added one, 2 x 12.3 J on lte), also after two
    failovers; a re-open that fails leaves the one tail the failed session charged."""
    lte = radio_profile("lte")
    assert lte is not None
    tail_j = lte.tail_energy_j()
    cases = [
        ([_Stream(target)], ""),
        ([_Stream(target, cut_after=2), _Stream(target)], ""),
        ([_Stream(target, cut_after=2), _Stream(target, cut_after=1), _Stream(target)], ""),
        (
            [_Stream(target, cut_after=2), _Stream(target, open_fails=True), _Stream(target, open_fails=True)],
            "re-opening the session failed",
        ),
    ]
    for streams, error in cases:
        res = _generate(target, drafter_model, streams, failovers=2, acct=EnergyAccountant(OneWatt(), lte))
        assert (res.failovers, error in res.error) == (sum(s.verdicts > 0 for s in streams[1:]), True), res.error
        bytes_j = lte.round_energy_j(res.stats.bytes_up, res.stats.bytes_down)
        # One whole tail, plus the tails cut short between a session's end and the next attempt
        # (milliseconds here): at most tail power x the generation's time.
        extra_j = res.stats.radio_j - bytes_j - tail_j
        assert 0 <= extra_j <= lte.tail_mw / 1e3 * res.elapsed_s, (len(streams), res.stats.radio_j, tail_j)


def test_prompts_back_to_back_are_charged_the_tails_that_happen(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """One accountant over a run: a generation that follows the last one within the radio's tail
    gives back the part of that tail the radio never spent (it was busy again), one that follows
    after the tail ended gives nothing back. So a run of back-to-back prompts is charged about one
    tail, not one per prompt (12.3 J each on LTE, most of every policy's J/token there)."""
    lte = radio_profile("lte")
    assert lte is not None
    acct = EnergyAccountant(OneWatt(), lte)
    t_start = time.perf_counter()
    first = _generate(target, drafter_model, [_Stream(target)], failovers=0, acct=acct)
    second = _generate(target, drafter_model, [_Stream(target)], failovers=0, acct=acct)
    # Bounds the time from the first's radio going idle to the second's end from above: that idle
    # mark comes before `_generate` returns (the generation still closes after it), so a clock
    # started at that return missed a part of it on a loaded machine (the test failed by ~4 ms).
    # Still far below a whole tail (12.3 J at LTE's 1 W: twelve seconds), which is what is checked.
    gap_s = time.perf_counter() - t_start
    tail_w = lte.tail_mw / 1e3
    for res, tail_j in ((first, lte.tail_energy_j()), (second, tail_w * gap_s)):
        bytes_j = lte.round_energy_j(res.stats.bytes_up, res.stats.bytes_down)
        # Plus the radio's connected state between the generation's own transfers (within its time).
        most_j = tail_j + tail_w * res.elapsed_s + 1e-9
        assert -1e-9 <= res.stats.radio_j - bytes_j <= most_j, (res.stats.radio_j, bytes_j, tail_j)
    second_j = second.stats.radio_j - lte.round_energy_j(second.stats.bytes_up, second.stats.bytes_down)
    assert second_j <= tail_w * (gap_s + second.elapsed_s) + 1e-9 < lte.tail_energy_j()  # not a whole tail

    short = replace(lte, tail_s=0.05, tail_mw=1000.0)  # a tail that has ended before the next prompt
    acct = EnergyAccountant(OneWatt(), short)
    _generate(target, drafter_model, [_Stream(target)], failovers=0, acct=acct)
    time.sleep(0.1)
    later = _generate(target, drafter_model, [_Stream(target)], failovers=0, acct=acct)
    bytes_j = short.round_energy_j(later.stats.bytes_up, later.stats.bytes_down)
    whole_j = bytes_j + short.tail_energy_j()  # nothing given back, and its own gaps on top
    assert whole_j - 1e-9 <= later.stats.radio_j <= whole_j + short.tail_mw / 1e3 * later.elapsed_s


def test_a_first_open_that_fails_leaves_no_tail_to_give_back(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """A first open answered wrong (no session ran: the generation raises, no totals) charged its
    attempt a tail that went nowhere; the next prompt, starting within that tail, must not be given
    back the unspent part of it (it once was: 12.3 J less than its own bytes and tail on LTE)."""
    lte = radio_profile("lte")
    assert lte is not None
    acct = EnergyAccountant(OneWatt(), lte)
    with pytest.raises(EdgeError, match="expected SessionOpened"):
        _generate(target, drafter_model, [_Stream(target, open_answered_wrong=True)], failovers=0, acct=acct)
    res = _generate(target, drafter_model, [_Stream(target)], failovers=0, acct=acct)
    bytes_j = lte.round_energy_j(res.stats.bytes_up, res.stats.bytes_down)
    assert res.stats.radio_j >= bytes_j + lte.tail_energy_j() - 1e-9


def test_a_generation_that_raises_mid_session_leaves_no_gap_running(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """A generation that raises after its session ran rounds (here its caller's round callback)
    reports no energy, and nothing of it runs on into the next one: its last transfer's mark once
    stayed, and the next prompt's first transfer charged the whole pause between the two as a gap
    of the radio's connected state (up to a tail: 12.3 J on LTE)."""
    lte = radio_profile("lte")
    assert lte is not None
    acct = EnergyAccountant(OneWatt(), lte)

    def fails(tele: Telemetry) -> None:
        if tele.round == 1:
            raise RuntimeError("the round callback failed")

    with pytest.raises(RuntimeError, match="round callback"):
        _generate(target, drafter_model, [_Stream(target)], failovers=0, acct=acct, on_round=fails)
    time.sleep(1.0)  # the pause: 1.06 J if it were charged
    res = _generate(target, drafter_model, [_Stream(target)], failovers=0, acct=acct)
    bytes_j = lte.round_energy_j(res.stats.bytes_up, res.stats.bytes_down)
    own_gaps_j = lte.tail_mw / 1e3 * res.elapsed_s  # at most the connected state over its own time
    assert bytes_j + lte.tail_energy_j() - 1e-9 <= res.stats.radio_j <= bytes_j + lte.tail_energy_j() + own_gaps_j


def test_failed_opens_charge_their_radio_joules_when_the_meter_could_not_read() -> None:
    """A failed re-open whose meter reading was NaN: the generation's energy is unknown (NaN, never
    0 J), but the radio tail joules the attempts were charged are known and go into the deficit
    queue (the NaN sum once took them with it: nothing was charged)."""
    failed = FailedOpens()
    failed.add(EdgeError(grpc.StatusCode.UNAVAILABLE, "gone"), (float("nan"), 0.5))
    failed.add(EdgeError(grpc.StatusCode.UNAVAILABLE, "gone again"), (0.2, 0.25))
    policy = parse_policy("gelato", PolicyOptions(budget_j_per_token=1.0))
    res = GenerationResult([1, 2], [3], 1.0)
    failed.settle_on(res, policy, EnergyAccountant(NullMeter(), None), keep_error=False)
    assert res.stats.energy_j != res.stats.energy_j and res.stats.radio_j == pytest.approx(0.75)  # NaN
    queue = policy.controller.queue
    assert queue is not None and queue.energy_j == pytest.approx(0.75)
    measured = FailedOpens()
    measured.add(EdgeError(grpc.StatusCode.UNAVAILABLE, "gone"), (0.2, 0.25))
    policy = parse_policy("gelato", PolicyOptions(budget_j_per_token=1.0))
    measured.settle_on(GenerationResult([1], [2], 1.0), policy, EnergyAccountant(NullMeter(), None), False)
    assert policy.controller.queue is not None and policy.controller.queue.energy_j == pytest.approx(0.45)


def test_the_totals_count_the_bytes_that_crossed_and_no_others(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """A generation's byte totals are what its streams really sent and received: the block
    written before a read that failed (once missing: lost with the exchange), and no close for
    a session that failed or whose close could not be written (once always counted)."""
    cases = [
        [_Stream(target)],
        [_Stream(target, cut_after=2)],  # fails: the last block was written, its verdict never came
        [_Stream(target, close_fails=True)],
        [_Stream(target, cut_after=2), _Stream(target, cut_after=1), _Stream(target)],
        [_Stream(target, cut_after=2), _Stream(target, open_refused=True), _Stream(target)],  # open sent, refused
        [_Stream(target, wrong_round_at=3)],  # fails: an answer read and refused
        [_Stream(target, cut_after=2), _Stream(target, open_answered_wrong=True)],  # a re-open answered wrong
    ]
    answer = pb.InfoResponse(protocol_version=1, vocab_size=target.vocab_size, context_limit=512)
    for streams in cases:
        infos: list[float] = []  # a refused re-open is followed by Info asks: radio traffic too
        res = _generate(target, drafter_model, streams, failovers=len(streams) - 1, infos=infos)
        sent, received = sum(s.sent_bytes for s in streams), sum(s.received_bytes for s in streams)
        sent += len(infos) * wire_bytes(pb.InfoRequest().ByteSize())
        received += len(infos) * wire_bytes(answer.ByteSize())
        assert (res.stats.bytes_up, res.stats.bytes_down) == (sent, received), (len(streams), res.error)


def test_a_failover_wait_is_charged_the_tails_it_spends(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """While the device waits for a restarting edge, the radio's tail after each transfer (the
    failed re-open, each Info ask) runs until the next one: a tail shorter than the pauses between
    asks (0.1, 0.2, 0.4 s here) is spent whole each time. Once the tail was cut when the wait
    began, so a long wait was charged no tail at all (12.3 J missing per waited failover on LTE)."""
    lte = radio_profile("lte")
    assert lte is not None
    short = replace(lte, tail_s=0.05, tail_mw=1000.0)
    streams = [_Stream(target, cut_after=2), _Stream(target, open_fails=True), _Stream(target)]
    acct = _GapCounting(OneWatt(), short)
    res = _generate(target, drafter_model, streams, failovers=2, loading_infos=3, acct=acct)
    assert res.error == "" and res.failovers == 1, res.error
    # Less the connected state between transfers (its gaps, however long the machine took; the
    # transfers' own time inside them, charged at the transfer power, is < 0.05 tail here).
    bytes_j = short.round_energy_j(res.stats.bytes_up, res.stats.bytes_down)
    tails = (res.stats.radio_j - bytes_j - acct.gaps_total_j) / short.tail_energy_j()
    # Whole: after each of the three "still loading" asks (each followed by a pause longer than
    # the tail) and after the last session; the others (the lost session's, the failed
    # re-open's, the ready ask's) cut short at once by the next transfer.
    assert 4 - 0.05 <= tails <= 5, tails
    assert acct.gaps_total_j > 0


class _GapCounting(EnergyAccountant):
    """Every gap joule charged, summed (the accountant settles them into totals as it goes)."""

    gaps_total_j = 0.0

    def _charge_gap(self, to_round: bool, now: float) -> None:
        before = self._gaps_j
        super()._charge_gap(to_round, now)
        self.gaps_total_j += self._gaps_j - before


def test_opens_that_fail_charge_the_queue_once_and_only_with_a_result(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """The energy of opens that failed joins the generation and the deficit queue once, when the
    generation reports it; a generation that raises (no session ever ran) charges nothing, as its
    error record has no energy. Each ask of the wait connects within what is left of
    `--edge-wait-s` (a first ask of the whole `--connect-timeout-s` overran a short wait)."""

    def budgeted() -> Policy:
        return parse_policy("fixed-4", PolicyOptions(budget_j_per_token=1.0))

    policy = budgeted()
    with pytest.raises(EdgeError, match="UNAVAILABLE"):
        streams = [_Stream(target, open_refused=True) for _ in range(3)]
        _generate(target, drafter_model, streams, 2, EnergyAccountant(OneWatt(), None), policy=policy)
    queue = policy.controller.queue
    assert queue is not None and queue.energy_j == 0.0
    policy, connects = budgeted(), []
    streams = [_Stream(target, cut_after=2), _Stream(target, open_refused=True), _Stream(target)]
    res = _generate(
        target,
        drafter_model,
        streams,
        2,
        EnergyAccountant(OneWatt(), None),
        loading_infos=2,
        policy=policy,
        edge_wait_s=0.3,
        connects=connects,
    )
    queue = policy.controller.queue
    assert queue is not None and res.error == "" and res.failovers == 1
    assert queue.energy_j == pytest.approx(res.stats.energy_j, rel=1e-9)  # every joule, once
    waits = connects[2:-1]  # the asks of the wait, between the failed re-open and the last open
    assert waits and all(s <= 0.3 for s in waits), connects
