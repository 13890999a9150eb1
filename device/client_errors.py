"""How the device's edge client names failures, and what failed opens cost.

Contract: `EdgeError` is a session or call that failed with a gRPC status code (the edge's own, or
one the device concluded itself, named so); `EdgeUnreachable` one where nothing answered at the
address; `write_error` turns a failed stream write into an `EdgeError` (a stream that ended under
the write is UNAVAILABLE, so the session fails over; `call_error` maps a read's status the same
way), `info_error` a failed `Info`; `worth_another_open`, `edge_answered` and `check_same_target`
judge a failed or re-opened session for the failover loop; `FailedOpens` gathers the opens that failed
in a row and charges what they cost to the generation they were for, once; `expect_verdict`
reads an edge message that must be a verdict (anything else is the edge's fault: INTERNAL);
`StreamIO` reads and writes a session stream with each failure as an `EdgeError`; `parsed` refuses
an answer whose bytes did not parse.
"""

from __future__ import annotations

import asyncio
import math
from typing import TypeVar

import grpc

from gelato.deadline import within
from gelato.device.energy import EnergyAccountant, wire_bytes
from gelato.device.generate import Exchange, GenerationResult, VerifyError, charge_bytes
from gelato.device.policy import Policy
from gelato.types import Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import decode_verdict


class EdgeError(VerifyError):
    """A session or call failed with `code`. `by_edge`: the edge's own status (its message then
    says "edge answered CODE: ..."); False for what the device concluded itself (a timeout, a
    stream that went away, an answer that is no verdict), named so, never put in the edge's mouth."""

    def __init__(self, code: grpc.StatusCode, details: str, by_edge: bool = True) -> None:
        super().__init__(f"edge answered {code.name}: {details}" if by_edge else f"{details} ({code.name})")
        self.code = code
        self.details = details
        self.by_edge = by_edge


class EdgeUnreachable(EdgeError):
    """Nothing answered at the address: the edge is down, or the address or network is wrong."""

    def __init__(self, target: str, timeout_s: float, tls: bool = False) -> None:
        what = f"no gelato-edge reachable at {target} within {timeout_s:g} s"
        super().__init__(grpc.StatusCode.UNAVAILABLE, what, by_edge=False)
        hint = (
            "; with TLS also check --tls-ca, the edge's certificate name (--tls-server-name), and for an edge "
            "that wants client certificates --tls-cert/--tls-key"
            if tls
            else ""
        )
        self.args = (f"could not reach gelato-edge at {target} within {timeout_s:g} s (--connect-timeout-s{hint})",)


# What grpc.aio sets as the call's status when a message it was sending fails in gRPC core: the
# stream ended under the write (the edge ended it, e.g. shutting down, or the connection broke).
# It replaces the status the edge sent, which is lost; the edge never sends these details itself.
CORE_WRITE_FAILURE = "Internal error from Core"


# What gRPC core's details hold when the call's own deadline (the device's --session-deadline-s)
# passes ("Deadline Exceeded", or "Stream removed (Deadline Exceeded)" when it ends a write); the
# edge's DEADLINE_EXCEEDED statuses say which of its timeouts ended the session, in other words.
LOCAL_DEADLINE = "Deadline Exceeded"


# What gRPC core's UNAVAILABLE details hold when the connection itself failed (the edge process
# died, the network dropped): "Stream removed (Socket closed)" for a stream cut under a read,
# "failed to connect to all addresses; ..." for a call that found no edge. An edge's own
# UNAVAILABLE (loading, shutting down) says so in words of its own.
CORE_LINK_LOST = ("Stream removed", "Socket closed", "Connection reset", "Broken pipe", "GOAWAY", "failed to connect")


M = TypeVar("M", pb.EdgeMessage, pb.InfoResponse)


def parsed(msg: M | None) -> M:
    """An answer as grpc.aio read it, or INTERNAL where its bytes did not parse: grpc.aio logs
    that and hands back None, raising nothing (`.WhichOneof` on it failed the whole run)."""
    if msg is None:
        raise EdgeError(
            grpc.StatusCode.INTERNAL,
            "the edge sent bytes that do not parse as gelato.v1's answer (a mismatched or corrupted edge build, "
            "or something in between)",
            by_edge=False,
        )
    return msg


def call_error(code: grpc.StatusCode, details: str | None, deadline_s: float) -> EdgeError:
    """A call's status as an EdgeError: the edge's, or what the device's side of the call concluded
    (its own deadline passing, the connection lost), named so, not put in the edge's mouth."""
    details = details or ""
    if code == grpc.StatusCode.OK:  # ended before an answer awaited or a write: not "edge answered OK"
        return EdgeError(
            grpc.StatusCode.INTERNAL,
            f"the edge ended the stream (status OK) while the session went on: {details}",
            by_edge=False,
        )
    if code == grpc.StatusCode.INTERNAL and details == CORE_WRITE_FAILURE:
        # Set by a write that failed in core, and read back by whatever asks the call next (a read
        # racing it, in send-ahead): the stream went away, whichever side asked first.
        return EdgeError(
            grpc.StatusCode.UNAVAILABLE,
            f"the stream to the edge ended while a message was being sent (gRPC: {CORE_WRITE_FAILURE})",
            by_edge=False,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and LOCAL_DEADLINE in details:
        return EdgeError(
            code, f"the session ran past --session-deadline-s ({deadline_s:g} s) before it ended", by_edge=False
        )
    if code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in CORE_LINK_LOST):
        return EdgeError(code, f"the connection to the edge was lost (gRPC: {details})", by_edge=False)
    return EdgeError(code, details)


def write_error(exc: grpc.aio.AioRpcError, deadline_s: float) -> EdgeError:
    """A failed write as an EdgeError: the stream went away under it (UNAVAILABLE, so the session
    fails over like any other lost edge), or the status the call ended with (`call_error`)."""
    return call_error(exc.code(), exc.details(), deadline_s)


FULL = grpc.StatusCode.RESOURCE_EXHAUSTED  # the edge's admission: session, KV or waiting-room limit
FULL_PAUSE_S = 0.5  # before the next attempt after a re-open an edge refused as full


def worth_another_open(exc: EdgeError, reopening: bool) -> bool:
    """An open that failed is tried again (one attempt of `--failovers`) when the edge was not there
    (UNAVAILABLE) or, for a re-open after a failover, was full: its generation has tokens to keep,
    and the fleet that lost a replica re-opens at once, so another replica may have the room."""
    return exc.code == grpc.StatusCode.UNAVAILABLE or (reopening and exc.code == FULL)


def check_same_target(model: str, eos: tuple[int, ...], target: tuple[str, tuple[int, ...] | None] | None) -> None:
    """A re-open must reach the target the generation began with (`model` and the end tokens in
    effect, `eos`): another one (a replica on a new checkpoint mid-upgrade, a misconfigured fleet)
    would continue its tokens with its own decoding, no longer the target's output. Ended as an
    error, not tried again, tokens kept."""
    if target is None or (model, eos) == target:
        return
    raise EdgeError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"the edge that took the re-open serves target {model!r} (end tokens "
        f"{list(eos)}), not {target[0]!r} (end tokens {list(target[1] or ())}) that this generation began "
        "with: its tokens would not continue that target's output; every replica behind --edge must serve "
        "the same target",
        by_edge=False,
    )


def edge_answered(exc: EdgeError) -> bool:
    """An open that failed so was answered by an edge (a refusal, an answer that was wrong): one is
    there, unlike one that found none (unreachable, the link lost)."""
    return not isinstance(exc, EdgeUnreachable) and (exc.by_edge or exc.code != grpc.StatusCode.UNAVAILABLE)


def info_error(exc: grpc.aio.AioRpcError, timeout_s: float, deadline_s: float) -> EdgeError:
    """A failed `Info` as an EdgeError; its own timeout passing names the setting that bounds it
    (`--connect-timeout-s`), not the edge."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and LOCAL_DEADLINE in (exc.details() or ""):
        what = f"the edge did not answer Info within {timeout_s:g} s (--connect-timeout-s)"
        return EdgeError(exc.code(), what, by_edge=False)
    return call_error(exc.code(), exc.details(), deadline_s)


class FailedOpens:
    """Opens that failed in a row (no session ran): what they cost, charged to the generation
    they were for, and why they failed."""

    def __init__(self) -> None:
        self.meter_j, self.radio_j, self.bytes_up, self.bytes_down = 0.0, 0.0, 0, 0
        self.errors: list[str] = []
        self.last: EdgeError | None = None

    def add(self, exc: EdgeError, spent_j: tuple[float, float]) -> None:
        """`spent_j`: the attempt's (meter, radio tail) joules (`EnergyAccountant.opening_spent_j`)."""
        self.meter_j += spent_j[0]
        self.radio_j += spent_j[1]
        self.bytes_up += exc.bytes_up  # the open written before it was refused
        self.bytes_down += exc.bytes_down  # a reply read that was no SessionOpened
        self.errors.append(str(exc))
        self.last = exc

    def settle_on(self, res: GenerationResult, policy: Policy, acct: EnergyAccountant, keep_error: bool = True) -> None:
        """Into `res`'s totals and the deficit queue, once (a generation that raises instead
        reports none of it: its error record has no energy); `keep_error`: the generation ends
        with these failures (else a session opened after them went on, its outcome stands)."""
        res.stats.energy_j += self.meter_j + self.radio_j  # NaN when the meter could not read: unknown
        res.stats.radio_j += self.radio_j
        # The queue gets what is known: the radio's joules always (modelled), the meter's when it
        # read (a NaN is charged as nothing, so the radio's part was once lost with it).
        policy.charge(self.radio_j)
        if math.isfinite(self.meter_j):
            policy.charge(self.meter_j)
        charge_bytes(res.stats, policy, acct, self.bytes_up, self.bytes_down)
        if keep_error:
            res.error = "; ".join([res.error, *(f"re-opening the session failed: {e}" for e in self.errors)])
            res.failure = self.last


def expect_verdict(down: pb.EdgeMessage, round_no: int | None = None, max_rounds: int = 1) -> Verdict:
    """The verdict an edge message must be; `round_no`: the round it must answer (one block at a
    time); `max_rounds`: the rounds one message may answer (streamed: `more_tokens`). Anything else
    is the edge's fault (INTERNAL), not a verdict for token 0."""
    kind = down.WhichOneof("kind")
    if kind != "verdict":
        raise EdgeError(
            grpc.StatusCode.INTERNAL, f"expected a verdict, got {kind or 'an empty message'}", by_edge=False
        )
    verdict = decode_verdict(down.verdict)
    if round_no is not None and (verdict.round != round_no or verdict.stale):
        what = f"round {verdict.round}" + (" stale" if verdict.stale else "")
        raise EdgeError(grpc.StatusCode.INTERNAL, f"edge answered {what}, expected round {round_no}", by_edge=False)
    if 1 + len(verdict.more_tokens) > max_rounds:
        raise EdgeError(
            grpc.StatusCode.INTERNAL,
            f"edge answered {1 + len(verdict.more_tokens)} rounds in one message, at most {max_rounds} expected",
            by_edge=False,
        )
    return verdict


def _cancelling() -> bool:
    """This task is being cancelled (its CancelledError goes on as it is)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cancelled_call(what: str) -> EdgeError:
    """A read or write of a stream raised CancelledError with this task not being cancelled:
    grpc.aio cancelled the call itself, as it does when another of its reads times out
    (`asyncio.timeout` cancels `call.read()`, and grpc cancels the call). A write in flight on the
    same call then raised CancelledError, which no handler of the round loop catches: the whole
    run ended in a traceback instead of this prompt's error."""
    return EdgeError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the stream was cancelled on this side during a {what} (another read or write of it timed out)",
        by_edge=False,
    )


class StreamIO:
    """A session stream's reads and writes, each failure an `EdgeError` (`EdgeClient`'s base):
    `verdict_timeout_s` bounds each, `deadline_s` names the call's own deadline when it passes."""

    deadline_s: float
    verdict_timeout_s: float

    async def _answer(
        self, call: grpc.aio.StreamStreamCall, round_no: int, bytes_up: int, max_rounds: int = 1
    ) -> Exchange:
        """The verdict for `round_no`, answering a message of `bytes_up` bytes just written; when
        it cannot be had, the VerifyError carries those bytes (spent all the same)."""
        down: pb.EdgeMessage | None = None
        try:
            down = await self._read(call)
            return Exchange(expect_verdict(down, round_no, max_rounds), bytes_up, wire_bytes(down.ByteSize()))
        except VerifyError as exc:  # no verdict for this round: what was sent and read, spent all the same
            exc.bytes_up += bytes_up
            exc.bytes_down += wire_bytes(down.ByteSize()) if down is not None else 0
            raise

    async def _ended(self, call: grpc.aio.StreamStreamCall, what: str) -> EdgeError:
        """The status a stream ended with, as an EdgeError (e.g. UNAVAILABLE when the edge stopped)."""
        return call_error(await call.code(), (await call.details()) or what, self.deadline_s)

    async def _write(self, call: grpc.aio.StreamStreamCall, msg: pb.DeviceMessage) -> None:
        """Write one message. An edge that takes none for `verdict_timeout_s` (hung: once the
        stream's window is full, HTTP/2 flow control holds the write) ends the session
        DEADLINE_EXCEEDED, as an unanswered read does, not at the call's deadline."""
        try:
            await within(call.write(msg), self.verdict_timeout_s)
        except TimeoutError:
            raise EdgeError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the edge took no message within {self.verdict_timeout_s:g} s (it stopped reading)",
                by_edge=False,
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise write_error(exc, self.deadline_s) from exc
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            # The RPC already finished (the edge ended the stream): report how it ended.
            raise await self._ended(call, "the edge ended the session") from None
        except asyncio.CancelledError:
            if _cancelling():
                raise
            raise _cancelled_call("write") from None

    async def _read(self, call: grpc.aio.StreamStreamCall) -> pb.EdgeMessage:
        try:
            msg = await within(call.read(), self.verdict_timeout_s)
        except grpc.aio.AioRpcError as exc:  # as a VerifyError, so the loop keeps what it has
            raise call_error(exc.code(), exc.details(), self.deadline_s) from exc
        except asyncio.CancelledError:
            if _cancelling():
                raise
            raise _cancelled_call("read") from None
        except TimeoutError:
            raise EdgeError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer from the edge within {self.verdict_timeout_s:g} s",
                by_edge=False,
            ) from None
        if msg is grpc.aio.EOF:
            raise await self._ended(call, "stream ended early")
        return parsed(msg)  # type: ignore[arg-type]
