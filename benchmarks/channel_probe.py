"""The channel's userspace parts: a delay relay with loss as retransmission stalls, and probes.

Contract. `LossyProxy(upstream, one_way_ms, jitter_ms, loss, loss_stall_ms, seed, listen)` is
`gelato.benchmarks.delay_proxy.DelayProxy` (order-preserving per direction, seeded jitter) plus loss: each
chunk is cut into MSS-sized segments, each lost with probability `loss`; a lost segment delays that
chunk by `loss_stall_ms` (what TCP shows for a lost segment: the data arrives once retransmitted,
late), and since deadlines never go backwards every later chunk of that direction waits behind it
(head-of-line blocking, as in TCP). Nothing is ever dropped or reordered: the byte stream is exact.
The default stall, 200 ms, is Linux's minimum RTO, which is also about what a tail-loss probe with
one segment in flight waits (1.5 RTT + 200 ms delayed-ACK allowance): the usual case for small
request/response messages. Each direction counts its lost segments.

Processes (run inside a network namespace with `ip netns exec NS ...`):
- `python -m gelato.benchmarks.channel_probe proxy --listen H:P --upstream H:P --one-way-ms D
  [--jitter-ms J --loss L --loss-stall-ms S --seed N]`: prints `listening on H:P`, SIGTERM stops it.
- `python -m gelato.benchmarks.channel_probe server --listen H:P`: the probe endpoint (prints `listening on`).
  Protocol per connection, first byte: `E` then echo everything; `U` + 8-byte length, then that many
  bytes in, one byte `K` back; `D` + 8-byte length, then that many bytes out.
- `python -m gelato.benchmarks.channel_probe client --address H:P [--grpc H:P] [--bytes-up N --bytes-down N]`:
  prints one JSON object: echo round trips (64-byte messages, ping-like), measured up/down rate
  (bulk transfer time minus one round trip), and timed gRPC `Info` calls when `--grpc` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import statistics
import sys
import time
from typing import Any

from gelato.benchmarks.delay_proxy import DelayProxy, Direction, grpc_info_rtt, rtt_summary, split_hostport

MSS_BYTES = 1448  # Ethernet MTU 1500 - IP/TCP headers with timestamps
DEFAULT_STALL_MS = 200.0


class LossyDirection(Direction):
    """A `Direction` whose chunks may be held back by retransmission stalls."""

    def __init__(
        self, delay_s: float, jitter_s: float, rng: random.Random, loss: float, stall_s: float, loss_rng: random.Random
    ) -> None:
        super().__init__(delay_s, jitter_s, rng)
        self.loss, self.stall_s, self.loss_rng = loss, stall_s, loss_rng
        self.segments = 0
        self.lost_segments = 0

    def stall(self, nbytes: int) -> float:
        segments = max(1, math.ceil(nbytes / MSS_BYTES))
        lost = sum(self.loss_rng.random() < self.loss for _ in range(segments)) if self.loss else 0
        self.segments += segments
        self.lost_segments += lost
        return self.stall_s if lost else 0.0  # one retransmission round recovers every loss of the chunk

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(64 * 1024):
            arrival = time.perf_counter() + self.stall(len(data))
            await self.queue.put((self.deadline(arrival), data))
        await self.queue.put(None)


class LossyProxy(DelayProxy):
    def __init__(
        self,
        upstream: str,
        one_way_ms: float,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        loss_stall_ms: float = DEFAULT_STALL_MS,
        seed: int = 0,
        listen: str = "127.0.0.1:0",
    ) -> None:
        if not 0.0 <= loss < 1.0 or loss_stall_ms < 0:
            raise ValueError("loss must be in [0, 1) and the loss stall >= 0 ms")
        super().__init__(upstream, one_way_ms, jitter_ms, seed, listen)
        self.loss, self.loss_stall_ms = loss, loss_stall_ms

    def _direction(self, conn: int, index: int) -> Direction:
        rng = random.Random(f"{self.seed}:{conn}:{index}")  # the same jitter stream as DelayProxy
        loss_rng = random.Random(f"{self.seed}:{conn}:{index}:loss")
        d = LossyDirection(
            self.one_way_ms / 1e3, self.jitter_ms / 1e3, rng, self.loss, self.loss_stall_ms / 1e3, loss_rng
        )
        self.directions.append(d)
        return d

    def lost_segments(self) -> dict[str, int]:
        ds = [d for d in self.directions if isinstance(d, LossyDirection)]
        return {"segments": sum(d.segments for d in ds), "lost": sum(d.lost_segments for d in ds)}


# ---------------------------------------------------------------- probe endpoint


async def _serve_probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        cmd = await reader.readexactly(1)
        if cmd == b"E":
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
        elif cmd == b"U":
            left = int.from_bytes(await reader.readexactly(8), "big")
            while left > 0 and (data := await reader.read(min(left, 256 * 1024))):
                left -= len(data)
            writer.write(b"K")
            await writer.drain()
        elif cmd == b"D":
            left = int.from_bytes(await reader.readexactly(8), "big")
            block = b"\0" * (64 * 1024)
            while left > 0:
                writer.write(block[: min(left, len(block))])
                left -= min(left, len(block))
                await writer.drain()
    writer.close()


async def _connect(address: str, cmd: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*split_hostport(address))
    writer.write(cmd)
    return reader, writer


async def echo_probe(address: str, n: int = 30) -> list[float]:
    """Round trips of 64-byte messages on one connection (after `E`), three warm-ups dropped."""
    reader, writer = await _connect(address, b"E")
    payload, samples = b"p" * 64, []
    try:
        for i in range(n + 3):
            t0 = time.perf_counter()
            writer.write(payload)
            await reader.readexactly(len(payload))
            if i >= 3:  # warm-up: connection set-up, slow start
                samples.append(time.perf_counter() - t0)
    finally:
        writer.close()
    return samples


async def rate_probe(address: str, direction: str, nbytes: int, rtt_s: float) -> dict[str, Any]:
    """Bulk transfer of `nbytes` up (`U`) or down (`D`); rate = bits / (time − one round trip)."""
    header = (b"U" if direction == "up" else b"D") + nbytes.to_bytes(8, "big")
    reader, writer = await _connect(address, b"")
    t0 = time.perf_counter()
    writer.write(header)
    try:
        if direction == "up":
            chunk = b"\0" * (64 * 1024)
            for off in range(0, nbytes, len(chunk)):
                writer.write(chunk[: min(len(chunk), nbytes - off)])
                await writer.drain()
            await reader.readexactly(1)
        else:
            await reader.readexactly(nbytes)
        elapsed = time.perf_counter() - t0
    finally:
        writer.close()
    mbps = nbytes * 8 / max(elapsed - rtt_s, 1e-6) / 1e6
    return {"bytes": nbytes, "elapsed_s": round(elapsed, 4), "measured_mbps": round(mbps, 3)}


async def probe(address: str, grpc: str | None, bytes_up: int, bytes_down: int, n: int) -> dict[str, Any]:
    echo = await echo_probe(address, n)
    rtt_s = statistics.median(echo)
    out: dict[str, Any] = {"echo": rtt_summary(echo)}
    if bytes_up:
        out["up"] = await rate_probe(address, "up", bytes_up, rtt_s)
    if bytes_down:
        out["down"] = await rate_probe(address, "down", bytes_down, rtt_s)
    if grpc:
        out["grpc_info"] = rtt_summary(await grpc_info_rtt(grpc, n=n))
    return out


# ---------------------------------------------------------------- processes


async def _run_until_signal(server: Any, line: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(line, flush=True)
    await stop.wait()


async def serve_proxy(args: argparse.Namespace) -> None:
    proxy = LossyProxy(
        args.upstream, args.one_way_ms, args.jitter_ms, args.loss, args.loss_stall_ms, args.seed, args.listen
    )
    async with proxy:
        line = (
            f"channel proxy: listening on {proxy.address} -> {args.upstream}, {args.one_way_ms:g} ms one way "
            f"± {args.jitter_ms:g} ms, loss {args.loss:g} (stall {args.loss_stall_ms:g} ms), seed {args.seed}"
        )
        await _run_until_signal(proxy, line)
    print("channel proxy: " + json.dumps(proxy.lost_segments()), flush=True)


async def serve_probe(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(_serve_probe, *split_hostport(args.listen))
    host, port = server.sockets[0].getsockname()[:2]
    async with server:
        await _run_until_signal(server, f"probe server: listening on {host}:{port}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato.benchmarks.channel_probe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    px = sub.add_parser("proxy", help="the delay/jitter/loss relay")
    px.add_argument("--listen", default="127.0.0.1:0")
    px.add_argument("--upstream", required=True)
    px.add_argument("--one-way-ms", type=float, default=10.0)
    px.add_argument("--jitter-ms", type=float, default=0.0)
    px.add_argument("--loss", type=float, default=0.0, help="per-segment loss probability")
    px.add_argument("--loss-stall-ms", type=float, default=DEFAULT_STALL_MS)
    px.add_argument("--seed", type=int, default=0)
    sv = sub.add_parser("server", help="the probe endpoint (echo, bulk up, bulk down)")
    sv.add_argument("--listen", default="127.0.0.1:0")
    cl = sub.add_parser("client", help="probe a path, print JSON")
    cl.add_argument("--address", required=True, help="probe server (or a relay in front of it)")
    cl.add_argument("--grpc", default=None, help="a gelato-edge (or relay) to time Info calls on")
    cl.add_argument("--bytes-up", type=int, default=0)
    cl.add_argument("--bytes-down", type=int, default=0)
    cl.add_argument("--n", type=int, default=30)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "proxy":
            asyncio.run(serve_proxy(args))
        elif args.cmd == "server":
            asyncio.run(serve_probe(args))
        else:
            res = asyncio.run(probe(args.address, args.grpc, args.bytes_up, args.bytes_down, args.n))
            print(json.dumps(res), flush=True)
    except (OSError, ValueError) as exc:
        print(f"channel_probe {args.cmd}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
