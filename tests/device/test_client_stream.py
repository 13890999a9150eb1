"""The device's stream writes when the edge ends the stream under them (device/client.py).

grpc.aio reports a write that fails because the call ended meanwhile as INTERNAL "Internal error
from Core" and drops the status the server sent. A send-ahead device writes while the edge may be
ending its stream (shutting down), so such a write must read as the stream going away
(UNAVAILABLE, which fails the session over), never as an edge fault. A real grpc.aio server here
ends each stream UNAVAILABLE after two messages while the real `EdgeClient` keeps writing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest

from gelato.device.client import EdgeClient
from gelato.device.client_errors import EdgeError, FailedOpens, expect_verdict, write_error
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant, wire_bytes
from gelato.device.generate import GenerationResult
from gelato.device.policy import Policy, PolicyOptions, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, encode_prompt
from gelato.power import NullMeter, radio_profile
from gelato.types import SamplingParams, SessionInfo, Telemetry, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import MODEL_LOADING, decode_block, encode_opened, encode_verdict
from tests.device.meters import OneWatt

SESSION = "/gelato.v1.Gelato/Session"
BLOCK = pb.DeviceMessage(draft=pb.DraftBlock(round=0, ids=list(range(8))))


async def _cut_after_two(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    seen = 0
    async for _ in requests:
        seen += 1
        if seen == 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "edge shutting down")
    yield b""


async def _server(session: Any = _cut_after_two, options: Any = None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=options)
    handler = grpc.stream_stream_rpc_method_handler(session)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("gelato.v1.Gelato", {"Session": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _write_until_refused(client: EdgeClient, writes: int = 2000) -> EdgeError | None:
    call = client.stub.Session()
    try:
        for _ in range(writes):
            await client._write(call, BLOCK)
    except EdgeError as exc:
        return exc
    finally:
        call.cancel()
    return None


def test_a_write_cut_by_the_edge_reads_as_unavailable() -> None:
    async def run() -> list[EdgeError | None]:
        server, address = await _server()
        client = EdgeClient(address, connect_timeout_s=5)
        try:
            await client.connect()
            return [await _write_until_refused(client) for _ in range(30)]
        finally:
            await client.close()
            await server.stop(None)

    errors = asyncio.run(run())
    assert all(e is not None for e in errors), "every stream is cut after two messages"
    assert {e.code for e in errors if e is not None} == {grpc.StatusCode.UNAVAILABLE}, [str(e) for e in errors]


async def _never_reads(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    await asyncio.sleep(3600)  # a hung edge: takes no message, answers nothing
    yield b""


def test_a_write_the_edge_never_takes_ends_within_the_verdict_timeout() -> None:
    """An edge that stops reading (hung): once the stream's window is full (a small one here, as
    one large sampling block fills a real one) the device's next write waits on HTTP/2 flow
    control. It ends DEADLINE_EXCEEDED after `verdict_timeout_s`, as an unanswered read does,
    instead of waiting for the call's deadline (an hour by default)."""

    async def run() -> tuple[EdgeError | None, float]:
        small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        server, address = await _server(_never_reads, small_window)
        client = EdgeClient(address, connect_timeout_s=5, verdict_timeout_s=1.0)
        try:
            await client.connect()
            t0 = time.perf_counter()
            error = await asyncio.wait_for(_write_until_refused(client), 20)
            return error, time.perf_counter() - t0
        finally:
            await client.close()
            await server.stop(None)

    error, waited_s = asyncio.run(run())
    assert error is not None and error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert "took no message" in str(error) and 1.0 <= waited_s < 5.0, (str(error), waited_s)


def test_only_the_core_write_failure_is_mapped() -> None:
    """Raw grpc.aio writes into the same server: the failures it really raises, mapped one by one.
    The edge's own statuses (here UNAVAILABLE; an INTERNAL with its own details) pass unchanged."""

    async def run() -> list[grpc.aio.AioRpcError]:
        server, address = await _server()
        seen: list[grpc.aio.AioRpcError] = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                session = channel.stream_stream(SESSION)
                for _ in range(30):
                    call = session()
                    try:
                        for _ in range(2000):
                            await call.write(BLOCK.SerializeToString())
                    except grpc.aio.AioRpcError as exc:
                        seen.append(exc)
                    except asyncio.InvalidStateError:
                        pass  # the call had ended before the write began: its status is the edge's
                    call.cancel()
        finally:
            await server.stop(None)
        return seen

    seen = asyncio.run(run())
    # What the mapping is for: grpc.aio does raise it here (were it gone, the mapping would be moot).
    assert any(exc.details() == "Internal error from Core" for exc in seen), [exc.details() for exc in seen]
    for exc in seen:
        mapped = write_error(exc, 3600.0)
        if exc.details() == "Internal error from Core":
            assert mapped.code == grpc.StatusCode.UNAVAILABLE
            assert "ended while a message was being sent" in mapped.details
        else:
            assert (mapped.code, mapped.details) == (exc.code(), exc.details())

    own = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "verify failed")
    assert write_error(own, 3600.0).code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE])
def test_other_write_failures_keep_their_status(code: grpc.StatusCode) -> None:
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "Internal error from Core")
    assert write_error(exc, 3600.0).code == code


class _Stream:
    """A session stream answered in process by a real target session, as the edge answers it.
    `cut_after`: the edge dies after that many verdicts (the next read fails UNAVAILABLE);
    `close_fails`: it dies right after its last verdict, so the close is written to a call that
    has ended (grpc.aio raises UsageError; the call's status is UNAVAILABLE)."""

    def __init__(
        self,
        target: LoadedModel,
        cut_after: int | None = None,
        close_fails: bool = False,
        open_s: float = 0.0,
        open_fails: bool = False,
        open_refused: bool = False,
        wrong_round_at: int | None = None,
        open_answered_wrong: bool = False,
    ) -> None:
        """`open_refused`: the open is taken, then answered UNAVAILABLE (an edge still loading);
        `wrong_round_at`: that verdict names the next round (an edge fault);
        `open_answered_wrong`: the open is answered with a verdict, not SessionOpened."""
        self.target, self.cut_after, self.close_fails, self.open_s = target, cut_after, close_fails, open_s
        self.open_fails, self.open_refused, self.wrong_round_at = open_fails, open_refused, wrong_round_at
        self.open_answered_wrong = open_answered_wrong
        self.replies: asyncio.Queue[pb.EdgeMessage | None] = asyncio.Queue()
        self.session: TargetSession | None = None
        self.verdicts = 0
        self.closed = False
        self.sent_bytes = self.received_bytes = 0  # what really crossed, framing included

    async def write(self, msg: pb.DeviceMessage) -> None:
        await self._take(msg)
        self.sent_bytes += wire_bytes(msg.ByteSize())  # taken: not when the write raised

    async def _take(self, msg: pb.DeviceMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "open":
            if self.open_fails:  # the replica is gone too: the attempt takes its time, then fails
                await asyncio.sleep(self.open_s)
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone"
                )
            if self.open_refused:
                self.replies.put_nowait(None)
                return
            if self.open_answered_wrong:
                self.replies.put_nowait(encode_verdict(Verdict(0, 0, 5)))
                return
            self.session = TargetSession("s", self.target, SamplingParams(), list(msg.open.prefix_ids))
            self.session.prefill()
            await asyncio.sleep(self.open_s)  # a longer prefill, as a real target's prompt takes
            info = SessionInfo("s", "tiny-target", self.target.context_limit, 32)
            self.replies.put_nowait(encode_opened(info))
        elif kind == "draft":
            assert self.session is not None
            if self.verdicts == self.cut_after:
                self.replies.put_nowait(None)
                return
            block = decode_block(msg.draft, self.target.vocab_size, True, 32)
            a, nxt = self.session.verify(block)
            self.verdicts += 1
            wrong = self.verdicts == self.wrong_round_at
            self.replies.put_nowait(encode_verdict(Verdict(block.round + wrong, a, nxt)))
        elif kind == "close":
            if self.close_fails:
                raise grpc.aio.UsageError("RPC already finished")
            self.closed = True

    async def read(self) -> pb.EdgeMessage:
        reply = await self.replies.get()
        if reply is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
        self.received_bytes += wire_bytes(reply.ByteSize())
        return reply

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    async def details(self) -> str:
        return "edge stopped"

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> None:
        pass


def _generate(
    target: LoadedModel,
    drafter_model: LoadedModel,
    streams: list[_Stream],
    failovers: int,
    acct: EnergyAccountant | None = None,
    loading_infos: int = 0,
    infos: list[float] | None = None,
    policy: Policy | None = None,
    edge_wait_s: float = 30.0,
    connects: list[float] | None = None,
    sessions: list[tuple[int, int | None]] | None = None,
    on_round: Callable[[Telemetry], None] | None = None,
) -> GenerationResult:
    """`loading_infos`: the edge answers that many `Info`s "still loading" (a restart), then
    ready; `infos` collects when each `Info` was asked, `connects` each connect's timeout."""

    async def run() -> GenerationResult:
        client = EdgeClient("127.0.0.1:1", failovers=failovers, edge_wait_s=edge_wait_s, connect_timeout_s=5.0)
        opened = iter(streams)
        asked = infos if infos is not None else []

        async def connect(timeout_s: float | None = None) -> None:
            if connects is not None:
                connects.append(client.connect_timeout_s if timeout_s is None else timeout_s)

        class Stub:
            def Session(self, **kwargs: object) -> _Stream:
                return next(opened)

            async def Info(self, request: pb.InfoRequest, **kwargs: object) -> pb.InfoResponse:
                asked.append(time.monotonic())
                if len(asked) <= loading_infos:
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), MODEL_LOADING
                    )
                return pb.InfoResponse(protocol_version=1, vocab_size=target.vocab_size, context_limit=512)

        client.connect = connect  # type: ignore[method-assign]
        client.stub = Stub()  # type: ignore[assignment]
        try:
            prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
            drafter = Drafter(drafter_model, SamplingParams())
            if sessions is None:
                return await client.generate(drafter, prompt, 20, policy or parse_policy("fixed-4"), acct, on_round)
            current = [0]

            def on_session(n: int) -> None:
                current[0] = n
                sessions.append((n, None))

            def log_round(tele: Telemetry) -> None:
                sessions.append((current[0], tele.round))

            return await client.generate(drafter, prompt, 20, parse_policy("fixed-4"), acct, log_round, on_session)
        finally:
            await client.close()

    return asyncio.run(run())


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
