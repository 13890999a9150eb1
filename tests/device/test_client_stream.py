"""The device's stream writes when the edge ends the stream under them (device/client.py).

grpc.aio reports a write that fails because the call ended meanwhile as INTERNAL "Internal error
from Core" and drops the status the server sent. A send-ahead device writes while the edge may be
ending its stream (shutting down), so such a write must read as the stream going away
(UNAVAILABLE, which fails the session over), never as an edge fault. A real grpc.aio server here
ends each stream UNAVAILABLE after two messages while the real `EdgeClient` keeps writing.

`_Stream` and `_generate` (a session stream answered in process by a real target session, and a
generation over such streams) serve test_client_stream_failover.py and test_client_stream_energy.py
too, and `_Stream` test_generation_seed.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from gelato.device.client import EdgeClient
from gelato.device.client_errors import EdgeError, call_error, write_error
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant, wire_bytes
from gelato.device.generate import GenerationResult
from gelato.device.policy import Policy, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, encode_prompt
from gelato.types import SamplingParams, SessionInfo, Telemetry, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import MODEL_LOADING, decode_block, encode_opened, encode_verdict

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


def test_a_read_that_finds_the_core_write_failure_fails_over_as_the_write_would() -> None:
    """grpc.aio overwrites the call's status with "Internal error from Core" when a write fails in
    core; a read racing that write (send-ahead reads while it writes) then reports that status. It
    must be the same lost stream (UNAVAILABLE: fail over), not an INTERNAL put in the edge's mouth."""
    err = call_error(grpc.StatusCode.INTERNAL, "Internal error from Core", 3600.0)
    assert err.code == grpc.StatusCode.UNAVAILABLE and "edge answered" not in str(err)
    assert call_error(grpc.StatusCode.INTERNAL, "verify failed", 3600.0).code == grpc.StatusCode.INTERNAL


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
        target_name: str = "tiny-target",
        eos_ids: tuple[int, ...] | None = None,
    ) -> None:
        """`open_refused`: the open is taken, then answered UNAVAILABLE (an edge still loading);
        `wrong_round_at`: that verdict names the next round (an edge fault);
        `open_answered_wrong`: the open is answered with a verdict, not SessionOpened;
        `target_name`: the target model its SessionOpened names; `eos_ids`: its end tokens (None:
        an older edge that says none)."""
        self.target, self.cut_after, self.close_fails, self.open_s = target, cut_after, close_fails, open_s
        self.open_fails, self.open_refused, self.wrong_round_at = open_fails, open_refused, wrong_round_at
        self.open_answered_wrong, self.target_name, self.eos_ids = open_answered_wrong, target_name, eos_ids
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
            info = SessionInfo("s", self.target_name, self.target.context_limit, 32, eos_token_ids=self.eos_ids)
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


def test_an_info_past_its_own_timeout_names_the_setting_not_the_edge() -> None:
    """An edge connected but slow to answer `Info` (wedged, or a slow link): the call's own
    timeout (`--connect-timeout-s`) passes. Reported as such, not as "edge answered
    DEADLINE_EXCEEDED", which blamed the edge and named no setting."""

    async def slow_info(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(5)
        return b""

    async def run() -> EdgeError:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(slow_info)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("gelato.v1.Gelato", {"Info": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = EdgeClient(f"127.0.0.1:{port}", connect_timeout_s=0.5)
        try:
            await client.connect(10)  # connected first: only the Info call's own timeout is tested
            with pytest.raises(EdgeError) as info:
                await client.info()
            return info.value
        finally:
            await client.close()
            await server.stop(None)

    err = asyncio.run(run())
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer Info within 0.5 s (--connect-timeout-s)" in str(err) and "edge answered" not in str(err)
