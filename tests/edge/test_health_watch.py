"""`EdgeHealth` (gelato.edge.endless): a watcher whose write never completes holds up no `set` (so
neither the edge's turn to SERVING after its load nor its shutdown), and Watch / Check answer as
the health protocol says: the status now, then each change, SERVICE_UNKNOWN for a name never set
(Watch) and NOT_FOUND for it (Check)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gelato.edge.endless import EdgeHealth

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Aborted(Exception):
    pass


class Context:
    """A servicer context whose writes are recorded; with `stall`, the first write never completes
    (a peer that grants no HTTP/2 window)."""

    def __init__(self, stall: bool = False) -> None:
        self.written: list[int] = []
        self.stall = stall
        self.writing = asyncio.Event()
        self.code: grpc.StatusCode | None = None

    async def write(self, reply: health_pb2.HealthCheckResponse) -> None:
        self.writing.set()
        if self.stall:
            await asyncio.Event().wait()
        self.written.append(reply.status)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> Any:
        self.code = code
        raise Aborted(details)


def test_a_watcher_that_never_reads_holds_up_no_set() -> None:
    async def scenario() -> tuple[int, int]:
        health = EdgeHealth()
        await health.set("gelato.v1.Gelato", NOT_SERVING)
        stuck = Context(stall=True)
        watcher = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(service=""), stuck))
        await asyncio.wait_for(stuck.writing.wait(), 5)
        # grpc_health's own servicer holds its lock across the write: these waited for ever.
        await asyncio.wait_for(health.set("", SERVING), 1)
        await asyncio.wait_for(health.set("gelato.v1.Gelato", SERVING), 1)
        check = Context()
        name = await health.Check(health_pb2.HealthCheckRequest(service="gelato.v1.Gelato"), check)
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""), check)
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        return name.status, overall.status

    assert asyncio.run(scenario()) == (SERVING, SERVING)


def test_watch_sends_the_status_then_each_change() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        health = EdgeHealth()
        ctx, other = Context(), Context()
        named = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(service="x"), ctx))
        overall = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(service=""), other))
        for status in (NOT_SERVING, SERVING, SERVING, NOT_SERVING):  # the repeat is no change
            await asyncio.sleep(0.01)
            await health.set("x", status)
        await health.set("", NOT_SERVING)
        await asyncio.sleep(0.01)
        for task in (named, overall):
            task.cancel()
        await asyncio.gather(named, overall, return_exceptions=True)
        return ctx.written, other.written

    named, overall = asyncio.run(scenario())
    assert named == [UNKNOWN, NOT_SERVING, SERVING, NOT_SERVING]
    assert overall == [SERVING, NOT_SERVING]


def test_a_change_during_a_write_is_sent_after_it() -> None:
    """The status set while a watcher's write is pending is the next thing it writes."""

    async def scenario() -> list[int]:
        health = EdgeHealth()
        release = asyncio.Event()
        ctx = Context()
        first = True

        async def slow_write(reply: health_pb2.HealthCheckResponse) -> None:
            nonlocal first
            ctx.writing.set()
            if first:
                first = False
                await release.wait()
            ctx.written.append(reply.status)

        ctx.write = slow_write  # type: ignore[method-assign]
        watcher = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(service=""), ctx))
        await ctx.writing.wait()
        await health.set("", NOT_SERVING)
        release.set()
        for _ in range(100):
            if len(ctx.written) == 2:
                break
            await asyncio.sleep(0.01)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return ctx.written

    assert asyncio.run(scenario()) == [SERVING, NOT_SERVING]


def test_check_of_an_unknown_name_is_not_found_and_a_long_one_invalid() -> None:
    async def scenario() -> list[grpc.StatusCode | None]:
        health = EdgeHealth()
        codes = []
        for name in ("never-set", "x" * 257):
            ctx = Context()
            with pytest.raises(Aborted):
                await health.Check(health_pb2.HealthCheckRequest(service=name), ctx)
            codes.append(ctx.code)
        ctx = Context()
        with pytest.raises(Aborted):
            await health.Watch(health_pb2.HealthCheckRequest(service="x" * 257), ctx)
        return [*codes, ctx.code]

    assert asyncio.run(scenario()) == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]
