"""How the edge answers what goes wrong: the status each failure gets, and ending a stream with it.

Contract: `parse_request(cls, data)` parses raw request bytes or raises `StatusError`
INVALID_ARGUMENT (the service takes bytes: gRPC would answer a failed deserialization UNKNOWN).
`internal_details(what, exc, incident)` is all a device is told of an edge fault: the error's kind
and an incident id (`new_incident()`), never its text, which the caller logs under that id.
`out_of_memory_status` and `pool_full_status` are RESOURCE_EXHAUSTED for a forward without memory
for its activations and for KV the pool could not make room for. `await end_stream(context, code,
details)` ends a Session stream with that status, waiting at most `ABORT_WAIT_S` behind answers its
device has not read. Status texts are clipped to `MAX_DETAILS` characters by the server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from gelato.deadline import within
from gelato.edge.kv_pool import PoolMemoryError
from gelato.edge.sessions import StatusError
from gelato.wire import clip

log = logging.getLogger("gelato.edge")
MAX_DETAILS = 1000  # characters of a status message: far below gRPC's 8 KiB metadata limit
# How long a Session stream's final status may wait behind answers its device has not read.
ABORT_WAIT_S = 10.0
_M = TypeVar("_M", bound=Message)


def parse_request(cls: type[_M], data: bytes) -> _M:
    """A message of type `cls` from raw request bytes; INVALID_ARGUMENT when they do not parse
    (corrupt wire format, bad UTF-8 in a string field)."""
    try:
        return cls.FromString(data)
    except (DecodeError, UnicodeDecodeError) as exc:  # pure-Python protobuf raises the latter for bad UTF-8
        name = cls.DESCRIPTOR.name
        raise StatusError(
            grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name} ({len(data)} bytes): {clip(str(exc))}"
        ) from None


def new_incident() -> str:
    """A short id that ties what a device is told to the edge's log line with the whole error."""
    return secrets.token_hex(4)


def internal_details(what: str, exc: BaseException, incident: str) -> str:
    """What a device is told of an edge fault: its kind and an incident id, never the exception's
    text (paths, shapes, a CUDA allocator's report of other processes), which goes to the log."""
    return f"{what} ({type(exc).__name__}), incident {incident}: see the edge's log"


def out_of_memory_status(exc: Exception) -> StatusError:
    """RESOURCE_EXHAUSTED for a forward that found no memory for its activations or logits (not
    a fault of the edge's code: the device is full, e.g. a pool grown without --kv-budget-mb)."""
    incident = new_incident()
    log.warning("a forward ran out of memory (incident %s): %s", incident, exc)
    details = f"edge out of memory for a forward's activations or logits, incident {incident}: see the edge's log"
    return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, details)


def pool_full_status(exc: PoolMemoryError) -> StatusError:
    """RESOURCE_EXHAUSTED for a session whose KV the pool could not make room for (the edge's
    memory, not its KV budget, ran out); the pool and every other session go on. The message is
    the pool's own (slots, tokens, MiB); the allocator's text goes to the log only."""
    log.warning("%s: %s", exc, exc.__cause__)
    return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"edge out of KV memory: {exc}")


async def end_stream(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a Session stream with `code`, but not at any cost: its status waits behind answers the
    device has not read, and a device that reads none (yet keeps its connection) would hold this
    handler's task, and the stream in the edge's count of open streams (which a shutdown waits
    for), for as long as that connection lasts. After `ABORT_WAIT_S` the handler ends anyway; the
    status stays queued in gRPC, which keeps the call and its unsent answers until the device reads
    them or its connection goes (no public grpc.aio call cancels a server call). Its session was
    freed before this is called."""
    try:
        await within(context.abort(code, details), ABORT_WAIT_S)
    except TimeoutError:
        log.info(
            "session stream: its %s status waited %g s behind unread answers: its handler ends", code.name, ABORT_WAIT_S
        )
        raise asyncio.CancelledError from None
