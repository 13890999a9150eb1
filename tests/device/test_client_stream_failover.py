"""`EdgeClient.generate` over session streams answered in process (`_Stream`), when the edge goes away,
restarts or answers wrong: a finished generation kept, re-opens and first opens tried again, a restarting
or loading edge waited for (`Info`, backing off, connect timeouts), replies that are not the round's
verdict, the session each round is told, and a drafter whose window is shorter than the target's."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gelato.device.client import EdgeClient
from gelato.device.client_errors import EdgeError, expect_verdict
from gelato.device.energy import EnergyAccountant, wire_bytes
from gelato.models import LoadedModel, encode_prompt
from gelato.types import SessionInfo, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import MODEL_LOADING, encode_opened, encode_verdict
from tests.device.meters import OneWatt
from tests.device.test_client_stream import _generate, _Stream


def test_an_edge_gone_after_the_last_verdict_keeps_the_finished_generation(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """Every token arrived, then the edge went away before the close: the generation stands (no
    error, no lost tokens), also when it is the session a failover re-opened."""
    ref = _generate(target, drafter_model, [closing := _Stream(target)], failovers=0)
    assert closing.closed and ref.stats.stop_reason in ("eos", "max_new_tokens") and ref.token_ids

    res = _generate(target, drafter_model, [_Stream(target, close_fails=True)], failovers=0)
    assert (res.token_ids, res.stats.stop_reason, res.error) == (ref.token_ids, ref.stats.stop_reason, "")
    assert res.target_model == "tiny-target"

    streams = [_Stream(target, cut_after=2), _Stream(target, close_fails=True)]
    res = _generate(target, drafter_model, streams, failovers=1)
    assert (res.token_ids, res.stats.stop_reason, res.failovers) == (ref.token_ids, ref.stats.stop_reason, 1)

    # Before the generation is complete a failure is one, as ever: the tokens so far, and why.
    res = _generate(target, drafter_model, [_Stream(target, cut_after=2)], failovers=0)
    assert res.stats.stop_reason == "error" and "UNAVAILABLE" in res.error
    assert 0 < len(res.token_ids) < len(ref.token_ids) and res.token_ids == ref.token_ids[: len(res.token_ids)]


def test_a_reply_that_is_not_the_rounds_verdict_is_an_edge_fault() -> None:
    """One block at a time, the reply must be that round's verdict: an empty message, an opened
    message or another round's (or a stale) verdict ends the generation as INTERNAL, instead of
    reading as a verdict for token 0 of the wrong round."""
    good = encode_verdict(Verdict(round=3, n_accepted=1, next_token=9))
    assert expect_verdict(good, 3) == Verdict(round=3, n_accepted=1, next_token=9)
    assert expect_verdict(good).round == 3  # send-ahead checks rounds itself
    bad = [
        (pb.EdgeMessage(), "expected a verdict, got an empty message"),
        (encode_opened(SessionInfo("s", "t", 64, 8)), "expected a verdict, got opened"),
        (good, "edge answered round 3, expected round 4"),
        (encode_verdict(Verdict(round=4, n_accepted=0, next_token=9, stale=True)), "round 4 stale, expected round 4"),
    ]
    for msg, said in bad:
        with pytest.raises(EdgeError, match=said) as info:
            expect_verdict(msg, 4)
        assert info.value.code == grpc.StatusCode.INTERNAL
    # Several rounds in one message: only as many as the device asked for in a Generate.
    streamed = encode_verdict(Verdict(round=4, n_accepted=0, next_token=9, more_tokens=(1, 2)))
    assert expect_verdict(streamed, 4, max_rounds=3).more_tokens == (1, 2)
    for asked in (1, 2):
        with pytest.raises(EdgeError, match=f"edge answered 3 rounds in one message, at most {asked} expected"):
            expect_verdict(streamed, 4, max_rounds=asked)


def test_a_drafter_with_a_shorter_window_than_the_target_drafts_only_within_it(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """The edge reports the target's context limit; a drafter whose own window is shorter drafts
    nothing at or past it (absolute positions would fail there), and the generation goes on to
    the target's limits with K = 0 rounds, the same tokens as with a drafter that fits."""
    from dataclasses import replace

    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
    window = len(prompt) + 6
    short = replace(drafter_model, context_limit=window)
    res = _generate(target, short, [_Stream(target)], failovers=0)
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    assert res.token_ids == ref.token_ids and res.stats.stop_reason == ref.stats.stop_reason
    length = len(prompt)
    for t in res.stats.rounds_log:  # every draft at a position below the drafter's window
        assert t.k == 0 or length + t.k <= window, (length, t.k)
        length += t.emitted
    assert length > window and res.stats.rounds_log[-1].k == 0  # it went on past the window


def test_a_reopen_that_fails_unavailable_is_tried_again(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """Right after a replica dies, round_robin may send the re-open to it before its connection is
    seen to be gone: that re-open fails UNAVAILABLE too, and the next attempt (of `failovers`)
    goes on. The output is the uninterrupted run's; one session was re-opened."""
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    streams = [_Stream(target, cut_after=2), _Stream(target, open_fails=True), _Stream(target)]
    res = _generate(target, drafter_model, streams, failovers=2)
    assert (res.token_ids, res.stats.stop_reason, res.error, res.failovers) == (
        ref.token_ids,
        ref.stats.stop_reason,
        "",
        1,
    )
    # With one attempt only, the failed re-open ends the generation, as ever.
    once = [_Stream(target, cut_after=2), _Stream(target, open_fails=True)]
    res = _generate(target, drafter_model, once, failovers=1)
    assert res.stats.stop_reason == "error" and "re-opening the session failed" in res.error


def test_each_round_is_told_its_session_also_after_a_session_without_rounds(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """`--trace`'s `session`: the first session opens and the edge dies before its first
    verdict, an open then fails, and the third attempt runs: its rounds belong to session 1 (once
    the session was inferred from rounds counting from 0 again, and with no round in session 0 the
    re-opened session's rounds read session 0)."""
    seen: list[tuple[int, int | None]] = []
    streams = [_Stream(target, cut_after=0), _Stream(target, open_fails=True), _Stream(target)]
    res = _generate(target, drafter_model, streams, failovers=3, sessions=seen)
    assert res.failovers == 1 and res.stats.stop_reason in ("eos", "max_new_tokens"), res.error
    assert [s for s, r in seen if r is None] == [0, 1, 1]  # told before each open, the failed one too
    rounds = [(s, r) for s, r in seen if r is not None]
    assert rounds and {s for s, _ in rounds} == {1} and [r for _, r in rounds] == list(range(len(rounds)))


def test_a_restarting_edge_is_waited_for_before_the_next_reopen(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """A lone edge restarts: the session fails, the first re-open fails too (the edge is gone),
    and the device then asks `Info` (backing off) until the edge answers ready instead of using
    its last attempt at once on an edge still loading; the output is the uninterrupted run's.
    The first re-open is not delayed (another replica may be there at once)."""
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    infos: list[float] = []
    streams = [_Stream(target, cut_after=2), _Stream(target, open_fails=True), _Stream(target)]
    t0 = time.monotonic()
    res = _generate(target, drafter_model, streams, failovers=2, loading_infos=3, infos=infos)
    assert (res.token_ids, res.stats.stop_reason, res.error, res.failovers) == (
        ref.token_ids,
        ref.stats.stop_reason,
        "",
        1,
    )
    assert len(infos) == 4  # three "still loading", then ready
    # The asks are radio traffic of this generation (once unmetered): four requests, one answer.
    sent, received = sum(s.sent_bytes for s in streams), sum(s.received_bytes for s in streams)
    answer = pb.InfoResponse(protocol_version=1, vocab_size=target.vocab_size, context_limit=512)
    ask_up, ask_down = 4 * wire_bytes(pb.InfoRequest().ByteSize()), wire_bytes(answer.ByteSize())
    assert (res.stats.bytes_up, res.stats.bytes_down) == (sent + ask_up, received + ask_down)
    pauses = [b - a for a, b in zip([t0, *infos], infos, strict=False)][1:]
    assert pauses[0] >= 0.09 and pauses[1] >= 0.19 and pauses[2] >= 0.39, pauses  # backing off
    # A session that fails once and is re-opened at once asks no Info at all.
    infos.clear()
    res = _generate(target, drafter_model, [_Stream(target, cut_after=2), _Stream(target)], failovers=2, infos=infos)
    assert res.error == "" and res.failovers == 1 and infos == []


def test_with_one_attempt_the_restarting_edge_is_waited_for_before_it(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """`--failovers 1`: the one re-open is also the last, so the wait comes before it (the edge
    restarting answers "still loading" twice, then ready); with no wait first it ran into the
    restart at once and the prompt failed, `--edge-wait-s` never used. The asks' bytes are the
    generation's."""
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    infos: list[float] = []
    streams = [_Stream(target, cut_after=2), _Stream(target)]
    res = _generate(target, drafter_model, streams, failovers=1, loading_infos=2, infos=infos)
    assert (res.token_ids, res.error, res.failovers) == (ref.token_ids, "", 1)
    assert len(infos) == 3  # two "still loading", then ready, then the re-open
    sent, received = sum(s.sent_bytes for s in streams), sum(s.received_bytes for s in streams)
    answer = pb.InfoResponse(protocol_version=1, vocab_size=target.vocab_size, context_limit=512)
    ask_up, ask_down = 3 * wire_bytes(pb.InfoRequest().ByteSize()), wire_bytes(answer.ByteSize())
    assert (res.stats.bytes_up, res.stats.bytes_down) == (sent + ask_up, received + ask_down)


def test_a_first_open_refused_unavailable_is_tried_again(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """The first open of a generation can meet a replica that just died, or a lone edge still
    loading after a restart: it is one attempt of `failovers`, the device waits for the edge
    (asking `Info`) and opens again; the output is the uninterrupted run's, no session was
    re-opened (`failovers` 0), and the refused open's energy is the generation's. With no
    attempt left it fails as before, with the edge's status."""
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    acct = EnergyAccountant(OneWatt(), None)
    streams = [_Stream(target, open_refused=True, open_s=0.0), _Stream(target)]
    infos: list[float] = []
    res = _generate(target, drafter_model, streams, failovers=1, acct=acct, loading_infos=2, infos=infos)
    assert (res.token_ids, res.error, res.failovers) == (ref.token_ids, "", 0)
    assert len(infos) == 3 and res.stats.energy_j == pytest.approx(res.elapsed_s, abs=0.05)
    with pytest.raises(EdgeError, match="UNAVAILABLE"):
        _generate(target, drafter_model, [_Stream(target, open_refused=True)], failovers=0)


def test_the_wait_for_a_loading_edge_gives_its_first_connect_the_whole_timeout() -> None:
    """`--edge-wait-s 0` at start means no waiting for a loading edge, not a 0.1 s connect: a
    handshake slower than that (TLS over a real network) is no absent edge; later asks connect
    within what is left of the wait."""

    async def run() -> list[float]:
        client = EdgeClient("127.0.0.1:1", connect_timeout_s=5.0)
        seen: list[float] = []

        async def connect(timeout_s: float | None = None) -> None:
            seen.append(client.connect_timeout_s if timeout_s is None else timeout_s)

        class Stub:
            async def Info(self, request: pb.InfoRequest, **kwargs: object) -> pb.InfoResponse:
                if len(seen) < 3:
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), MODEL_LOADING
                    )
                return pb.InfoResponse(protocol_version=1, vocab_size=10, context_limit=10)

        client.connect = connect  # type: ignore[method-assign]
        client.stub = Stub()  # type: ignore[assignment]
        try:
            with pytest.raises(EdgeError, match="still loading"):
                await client.wait_ready(0.0, any_unavailable=False)
            assert seen == [5.0]
            seen.clear()
            await client.wait_ready(1.0, any_unavailable=False)
            return seen
        finally:
            await client.close()

    seen = asyncio.run(run())
    assert seen[0] == 5.0 and len(seen) == 3 and all(0.1 <= s < 1.0 for s in seen[1:]), seen
