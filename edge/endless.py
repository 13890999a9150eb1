"""Bounds on the edge's streams that never end on their own: health's `Watch` and reflection.

Contract: `StreamCap(methods, limit)` is a `grpc.aio.ServerInterceptor`; at most `limit` calls of
each method in `methods` run at once, and one more ends at once with RESOURCE_EXHAUSTED (the text
names the method and the limit) without reaching the service. A call frees its place when it ends,
however it ends; `end_all()` ends every open one (at shutdown). `EdgeHealth` is the health
servicer with two more rules: a `Watch` or `Check` for a service name longer than
`MAX_SERVICE_NAME_CHARS` is refused INVALID_ARGUMENT, since a watcher keeps its request (up to the
4 MiB message limit) for as long as it watches; and `set` never waits for a watcher's write.

Why: a Session stream is bounded by admission and by the cap on streams waiting to open; these
two hold a task and gRPC's call state each for as long as the client keeps them, so without a
cap one client (with the token, or anyone where the edge runs without one) could open them
without limit. `Check` stays unbounded: it answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

_T = TypeVar("_T")
WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"
ENDLESS_METHODS = frozenset({WATCH, REFLECTION})
MAX_ENDLESS_STREAMS = 64  # per method: monitors and debugging tools, not one per device
ENDLESS_SETTLE_S = 0.05  # at shutdown, from NOT_SERVING to ending the streams (`StreamCap.end_all`)
MAX_SERVICE_NAME_CHARS = 256  # the edge's own names are under 20


class StreamCap(grpc.aio.ServerInterceptor):
    def __init__(self, methods: frozenset[str], limit: int) -> None:
        self.methods = methods
        self.limit = limit
        self.active: Counter[str] = Counter()
        self._closing = asyncio.Event()

    def end_all(self) -> None:
        """End every open capped stream UNAVAILABLE, and any opened later (at shutdown: a health
        `Watch` never ends on its own, and gRPC's stop waited for it to the end of its grace
        period and backstop, sessions or not)."""
        self._closing.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in self.methods or not handler.response_streaming:
            return handler
        return self._capped(handler, details.method)

    async def _enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if self.active[method] >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.active[method]} {method} streams are open on this edge (at most {self.limit}); "
                "close one or try again later",
            )
        self.active[method] += 1

    async def _until_closing(self, work: Awaitable[_T], context: grpc.aio.ServicerContext) -> _T:
        """`work`'s result, unless `end_all` comes first: then `work` is cancelled and the call
        ends UNAVAILABLE."""
        job = asyncio.ensure_future(work)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((job, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not job.done():
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job  # done before the generator it may be running is closed
        if not job.cancelled():
            return job.result()
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        raise AssertionError("abort returned")  # abort raises; for the type checker

    def _capped(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        behaviour: Callable[..., Any]
        if inspect.isasyncgenfunction(inner):

            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._enter(method, context)
                replies = inner(request, context)
                try:
                    while (reply := await self._until_closing(_next(replies), context)) is not _END:
                        yield reply
                finally:
                    self.active[method] -= 1
                    await replies.aclose()

            behaviour = streamed
        else:  # a coroutine that writes its replies with context.write

            async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
                await self._enter(method, context)
                try:
                    await self._until_closing(inner(request, context), context)
                finally:
                    self.active[method] -= 1

            behaviour = written
        if handler.request_streaming:
            make = grpc.stream_stream_rpc_method_handler
        else:
            make = grpc.unary_stream_rpc_method_handler
        return make(behaviour, handler.request_deserializer, handler.response_serializer)


_END = object()  # an async generator's end, as `_next` returns it
SHUTTING_DOWN = "edge shutting down"


async def _next(replies: AsyncIterator[Any]) -> Any:
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return _END


class EdgeHealth(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1.Health` (Check, Watch) and `set`, as grpc_health's asyncio servicer serves
    them, with two rules of the edge's: a name over `MAX_SERVICE_NAME_CHARS` is refused
    INVALID_ARGUMENT, and no watcher holds up `set`. grpc_health's `Watch` writes under the lock its
    `set` takes, so one watcher whose write never completes (an HTTP/2 peer that grants no window)
    kept the edge from turning SERVING after its load and stalled its shutdown at NOT_SERVING. Here
    a watcher writes with no lock held, and `set` only records the status and wakes the watchers."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Event()  # set, and replaced, by every `set`

    async def set(self, service: str, status: int) -> None:
        self._status[service] = status
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _refuse_long_name(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if len(request.service) > MAX_SERVICE_NAME_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"health service name of {len(request.service)} characters (at most {MAX_SERVICE_NAME_CHARS})",
            )

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        await self._refuse_long_name(request, context)
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        """The status now, then each change (a change missed while a write was pending is
        coalesced: the watcher gets the latest, as the health protocol allows)."""
        await self._refuse_long_name(request, context)
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        last: int | None = None
        while True:
            changed = self._changed  # taken before the status is read: no change slips between
            status = self._status.get(request.service, unknown)
            if status == last:
                await changed.wait()
                continue
            await context.write(health_pb2.HealthCheckResponse(status=status))
            last = status
