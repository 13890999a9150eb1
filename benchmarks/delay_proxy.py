"""A userspace TCP relay on loopback that adds a fixed one-way delay per direction.

Contract. `DelayProxy(upstream="HOST:PORT", one_way_ms=10, jitter_ms=0, seed=0)` listens on
`listen` (default `127.0.0.1:0`); every accepted connection gets its own upstream connection, and
each chunk read in one direction is written out at

    deadline = max(arrival + one_way_ms (+ uniform jitter in ±jitter_ms, seeded), previous deadline)

so byte order is preserved per direction and a burst is delayed, not reordered. Use it as a library

    async with DelayProxy(upstream="127.0.0.1:50051", one_way_ms=10) as proxy:
        ...connect to proxy.address...

or as a process: `python -m gelato.benchmarks.delay_proxy --listen 127.0.0.1:0 --upstream HOST:PORT
--one-way-ms 10 [--jitter-ms 2 --seed 0]`, which prints `listening on HOST:PORT` and runs until
SIGTERM/SIGINT. It relays bytes only, so HTTP/2 (gRPC) works through it unchanged. Half-closes are
forwarded after the data queued before them.

Timing. epoll waits are 1 ms coarse, so a writer sleeps on the event loop until `SPIN_MARGIN_S`
(1.5 ms) before its deadline and then finishes with a short blocking sleep + spin: measured on the
development machine, 10/20/50 ms one way → 20.3/40.3/100.4 ms round trips this way. The blocking
part stalls the loop for at most the margin; meanwhile no other connection's chunk is read and
stamped, so with several busy connections (the benchmark's devices all dial one relay) a chunk can
arrive up to the margin late.

Probes, so runs record the round trip they really had next to the nominal one:
`echo_rtt(one_way_ms, ...)` (small echoes through an in-process proxy to an in-process echo
server: the relay's own accuracy), `tcp_echo_rtt(address)` (echoes to any echo endpoint) and
`grpc_info_rtt(address)` (timed `Info` calls to a gelato-edge, e.g. through a proxy process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gelato.benchmarks.procs import child_env, stop_process

SPIN_MARGIN_S = 1.5e-3  # below this the event loop's 1 ms epoll granularity would miss the deadline
SLEEP_SLACK_S = 1e-4  # nanosleep overshoots by ~50 µs (timer slack): spin the last 100 µs
READ_SIZE = 64 * 1024
QUEUE_CHUNKS = 1024  # per direction; a full queue stops reading, i.e. TCP backpressure


def split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def wait_until(deadline: float) -> None:
    """Coarse sleep on the loop, then a blocking sleep + spin to hit `deadline` (perf_counter s)."""
    rest = deadline - time.perf_counter()
    if rest > SPIN_MARGIN_S:
        await asyncio.sleep(rest - SPIN_MARGIN_S)
    rest = deadline - time.perf_counter()
    if rest > SLEEP_SLACK_S:
        time.sleep(rest - SLEEP_SLACK_S)
    while time.perf_counter() < deadline:
        pass


class Direction:
    """One direction of one connection: stamps chunks on arrival, writes them at their deadline."""

    def __init__(self, delay_s: float, jitter_s: float, rng: random.Random) -> None:
        self.delay_s, self.jitter_s, self.rng = delay_s, jitter_s, rng
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        self.last_deadline = 0.0
        self.chunks = 0
        self.bytes = 0

    def deadline(self, arrival: float) -> float:
        jitter = self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        # Never before the previous chunk's deadline: TCP is a byte stream, reordering would corrupt it.
        self.last_deadline = max(arrival + max(self.delay_s + jitter, 0.0), self.last_deadline)
        return self.last_deadline

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(READ_SIZE):
            await self.queue.put((self.deadline(time.perf_counter()), data))
        await self.queue.put(None)  # EOF: the writer half-closes after what is queued

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        while (item := await self.queue.get()) is not None:
            deadline, data = item
            await wait_until(deadline)
            if writer.transport.is_closing():
                # The receiver is gone (asyncio would drop the writes and only log them): end the
                # relay of this connection, which closes the sender's side too, as a reset would.
                raise ConnectionResetError("the receiving side of the relayed connection closed")
            writer.write(data)
            self.chunks += 1
            self.bytes += len(data)
            if writer.transport.get_write_buffer_size() > READ_SIZE:
                await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()


class DelayProxy:
    """The relay (module docstring). `directions` lists every connection's two `Direction`s (their
    chunk and byte counts); subclasses may override `_direction` to shape a direction differently."""

    def __init__(
        self,
        upstream: str,
        one_way_ms: float,
        jitter_ms: float = 0.0,
        seed: int = 0,
        listen: str = "127.0.0.1:0",
    ) -> None:
        if one_way_ms < 0 or jitter_ms < 0:
            raise ValueError("--one-way-ms and --jitter-ms must be >= 0")
        self.upstream = split_hostport(upstream)
        self.listen = split_hostport(listen)
        self.one_way_ms, self.jitter_ms, self.seed = one_way_ms, jitter_ms, seed
        self.connections = 0
        self.directions: list[Direction] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()  # one per connection
        self._pumps: set[asyncio.Future[Any]] = set()  # four per connection

    @property
    def address(self) -> str:
        assert self._server is not None, "DelayProxy not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Cancel the pumps, not the handlers: asyncio's server callback logs a cancelled handler as
        # an error. Each handler then sees its pumps done, closes both sockets and returns.
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _direction(self, conn: int, index: int) -> Direction:
        # A seeded stream per (connection, direction): the same run gets the same jitter sequence.
        rng = random.Random(f"{self.seed}:{conn}:{index}")
        d = Direction(self.one_way_ms / 1e3, self.jitter_ms / 1e3, rng)
        self.directions.append(d)
        return d

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        conn, self.connections = self.connections, self.connections + 1
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        up, down = self._direction(conn, 0), self._direction(conn, 1)
        pumps = [up.read_from(c_reader), up.write_to(u_writer), down.read_from(u_reader), down.write_to(c_writer)]
        tasks = [asyncio.ensure_future(p) for p in pumps]
        self._handlers.add(handler)
        self._pumps.update(tasks)
        try:
            # Normally all four end (both EOFs relayed); a reset on either side ends the relay at once.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (c_writer, u_writer):
                w.close()
            self._pumps.difference_update(tasks)
            self._handlers.discard(handler)


# ---------------------------------------------------------------- probes


def rtt_summary(samples_s: list[float], nominal_ms: float | None = None) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in samples_s)
    out: dict[str, Any] = {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "p10_ms": round(ms[len(ms) // 10], 3),
        "p90_ms": round(ms[(9 * len(ms)) // 10], 3),
    }
    if nominal_ms is not None:
        out["nominal_ms"] = nominal_ms
    return out


async def time_calls(call: Callable[[], Awaitable[object]], n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):  # connection setup, HTTP/2 settings, first-call allocations
        await call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return samples


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    writer.close()


async def tcp_echo_rtt(address: str, n: int = 30, size: int = 64) -> list[float]:
    """Round trips of `size`-byte messages over one TCP connection to an echo endpoint."""
    reader, writer = await asyncio.open_connection(*split_hostport(address))
    payload = b"x" * size

    async def once() -> None:
        writer.write(payload)
        await reader.readexactly(size)

    try:
        return await time_calls(once, n)
    finally:
        writer.close()


async def echo_rtt(one_way_ms: float, jitter_ms: float = 0.0, seed: int = 0, n: int = 30) -> dict[str, Any]:
    """The relay's accuracy: small echoes through an in-process proxy to an in-process echo server."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with DelayProxy(f"{host}:{port}", one_way_ms, jitter_ms, seed) as proxy:
            samples = await tcp_echo_rtt(proxy.address, n)
    finally:
        server.close()
        await server.wait_closed()
    return rtt_summary(samples, 2 * one_way_ms)


async def grpc_info_rtt(address: str, n: int = 20, timeout_s: float = 30.0) -> list[float]:
    """Timed `gelato.v1.Gelato/Info` calls on one channel (gRPC's own overhead included, ~0.5 ms)."""
    import grpc

    from gelato.channel import CLIENT_OPTIONS
    from gelato.v1 import gelato_pb2 as pb
    from gelato.v1 import gelato_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.GelatoStub(channel)
        return await time_calls(lambda: stub.Info(pb.InfoRequest(), timeout=timeout_s, wait_for_ready=True), n)


# ---------------------------------------------------------------- as a process


class ProxyProcess:
    """The relay in its own process (its own GIL: the spin never stalls the device's or edge's
    event loop), optionally under a launcher such as `taskset -c 0`. `address` once listening;
    `stop()` sends SIGTERM. A daemon thread drains its output so a full pipe never blocks it."""

    def __init__(
        self,
        upstream: str,
        one_way_ms: float,
        jitter_ms: float = 0.0,
        seed: int = 0,
        prefix: list[str] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.cmd = [*(prefix or []), sys.executable, "-m", "gelato.benchmarks.delay_proxy", "--upstream", upstream]
        self.cmd += ["--one-way-ms", f"{one_way_ms:g}", "--jitter-ms", f"{jitter_ms:g}", "--seed", str(seed)]
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env()
        )
        self.address = ""
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, name="proxy-output", daemon=True).start()
        if not self._ready.wait(timeout_s) or not self.address:
            self.stop()
            raise RuntimeError("delay_proxy did not start:\n" + "".join(self.lines[-50:]))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = None if self.address else re.search(r"listening on ([\w.\-\[\]:]+:\d+)", line)
            if m:
                self.address = m.group(1)
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which then sees no address

    def stop(self) -> int:
        return stop_process(self.proc, 10)


# ---------------------------------------------------------------- process entry point


async def serve(args: argparse.Namespace) -> None:
    async with DelayProxy(args.upstream, args.one_way_ms, args.jitter_ms, args.seed, args.listen) as proxy:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"delay_proxy: listening on {proxy.address} -> {args.upstream}, "
            f"{args.one_way_ms:g} ms one way ± {args.jitter_ms:g} ms (seed {args.seed})",
            flush=True,
        )
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="delay_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on (port 0: any free port)")
    p.add_argument("--upstream", help="HOST:PORT to relay to")
    p.add_argument("--one-way-ms", type=float, default=10.0)
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform ± jitter per chunk (order kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="print the echo round trip through a proxy and exit")
    args = p.parse_args(argv)
    try:
        if args.probe:
            print(asyncio.run(echo_rtt(args.one_way_ms, args.jitter_ms, args.seed)), flush=True)
            return 0
        if not args.upstream:
            p.error("--upstream is required (or --probe)")
        split_hostport(args.upstream)
        split_hostport(args.listen)
        if args.one_way_ms < 0 or args.jitter_ms < 0:
            p.error("--one-way-ms and --jitter-ms must be >= 0")
    except ValueError as exc:
        p.error(str(exc))
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        print(f"delay_proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
