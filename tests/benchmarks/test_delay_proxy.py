"""The channel emulator (`gelato.benchmarks.delay_proxy`): the round trip it adds, byte order under jitter,
and gRPC through it to a real edge, both in process and as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import statistics

import pytest

from gelato.benchmarks.delay_proxy import DelayProxy, ProxyProcess, echo_rtt, grpc_info_rtt, split_hostport, wait_until


def test_round_trip_matches_nominal() -> None:
    rtt = asyncio.run(echo_rtt(10.0, n=40))
    # Never faster than the wire it emulates; within ±15 % (+1 ms) of 20 ms. On the 10th percentile,
    # not the median: on a busy machine a late wake-up of the event loop adds to a round trip, and
    # can hit half of them, while a relay that adds the wrong delay shifts every round trip.
    assert 20.0 <= rtt["p10_ms"] <= 20.0 * 1.15 + 1.0, rtt
    assert rtt["nominal_ms"] == 20.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _many_small_writes(n: int) -> tuple[bytes, bytes, int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    # Jitter larger than the delay between writes: a reordering relay would scramble the stream.
    async with DelayProxy(f"{host}:{port}", one_way_ms=2.0, jitter_ms=2.0, seed=3) as proxy:
        reader, writer = await asyncio.open_connection(*split_hostport(proxy.address))
        sent = b"".join(i.to_bytes(4, "big") for i in range(n))
        for i in range(n):
            writer.write(sent[4 * i : 4 * i + 4])
            if i % 5 == 0:
                await asyncio.sleep(0.0002)  # let the relay see separate chunks
        got = await asyncio.wait_for(reader.readexactly(len(sent)), timeout=30)
        writer.close()
        chunks = proxy.directions[0].chunks
    server.close()
    await server.wait_closed()
    return sent, got, chunks


def test_order_preserved_for_many_small_writes() -> None:
    sent, got, chunks = asyncio.run(_many_small_writes(1000))
    assert chunks > 50  # really many separately delayed chunks, not one coalesced write
    assert got == sent


def test_deadline_is_monotone_per_direction() -> None:
    proxy = DelayProxy("127.0.0.1:1", one_way_ms=1.0, jitter_ms=5.0, seed=0)
    d = proxy._direction(0, 0)
    deadlines = [d.deadline(t * 1e-4) for t in range(200)]
    assert deadlines == sorted(deadlines)
    assert all(x >= t * 1e-4 for t, x in enumerate(deadlines))  # never before arrival


def test_jitter_is_seeded() -> None:
    def deadlines(seed: int) -> list[float]:
        d = DelayProxy("127.0.0.1:1", one_way_ms=10.0, jitter_ms=2.0, seed=seed)._direction(0, 0)
        return [d.deadline(t * 0.05) for t in range(20)]  # 50 ms apart: no chunk waits for another

    assert deadlines(1) == deadlines(1) != deadlines(2)
    delays = [x - t * 0.05 for t, x in enumerate(deadlines(1))]
    assert all(0.008 <= d <= 0.012 for d in delays)  # 10 ms ± 2 ms


def test_wait_until_is_precise() -> None:
    async def late_by() -> list[float]:
        import time

        out = []
        for _ in range(40):
            # Half a millisecond off the loop's 1 ms epoll steps: a wait on the loop alone ends ~0.5 ms late.
            deadline = time.perf_counter() + 0.0045
            await wait_until(deadline)
            out.append(time.perf_counter() - deadline)
        return sorted(out)

    lateness = asyncio.run(late_by())
    # The spin ends ~1 µs late; a blocking sleep to the deadline ends ~70 µs late (50 µs of it timer
    # slack), a wait on the loop alone ~0.5 ms. On the 25th percentile: a busy machine may preempt a few spins.
    assert lateness[0] >= 0 and lateness[len(lateness) // 4] < 50e-6, lateness


def test_bad_addresses_are_refused() -> None:
    with pytest.raises(ValueError):
        split_hostport("localhost")
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1:1", one_way_ms=-1)


def test_grpc_info_through_proxy_in_process(edge) -> None:  # type: ignore[no-untyped-def]
    async def run() -> list[float]:
        async with DelayProxy(edge.address, one_way_ms=5.0) as proxy:
            return await grpc_info_rtt(proxy.address, n=5)

    samples = asyncio.run(run())
    assert 0.010 <= statistics.median(samples) < 0.030


def test_grpc_info_through_proxy_process(edge) -> None:  # type: ignore[no-untyped-def]
    proxy = ProxyProcess(edge.address, one_way_ms=5.0)
    try:
        samples = asyncio.run(grpc_info_rtt(proxy.address, n=5))
    finally:
        assert proxy.stop() == 0  # SIGTERM is a clean shutdown
    assert 0.010 <= statistics.median(samples) < 0.030
    assert "listening on" in "".join(proxy.lines)


def test_a_connection_whose_receiver_left_is_ended_on_both_sides() -> None:
    """The client closes while the upstream keeps sending: the relay went on writing into the
    closed socket (asyncio drops such writes, logging them), its handler and pumps stayed, and the
    upstream never learnt. Now the relay of that connection ends and the upstream's side closes."""

    async def scenario() -> tuple[int, int, bool]:
        upstream_done = asyncio.Event()

        async def streamer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while not writer.transport.is_closing():  # until the relay closes this side
                    writer.write(b"x" * 1000)
                    await writer.drain()
                    await asyncio.sleep(0.01)
            except (ConnectionError, OSError):
                pass
            finally:
                upstream_done.set()

        server = await asyncio.start_server(streamer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with DelayProxy(f"127.0.0.1:{port}", 5) as proxy:
            host, p = split_hostport(proxy.address)
            reader, writer = await asyncio.open_connection(host, p)
            await reader.read(100)
            writer.close()
            await writer.wait_closed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(upstream_done.wait(), 5)
            await asyncio.sleep(0.1)
            handlers, pumps = len(proxy._handlers), len(proxy._pumps)
        server.close()
        return handlers, pumps, upstream_done.is_set()

    handlers, pumps, upstream_ended = asyncio.run(scenario())
    assert (handlers, pumps) == (0, 0) and upstream_ended
