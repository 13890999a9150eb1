"""The gRPC echo of the round-overhead benchmark (`gelato.benchmarks.round_overhead`): the transport floor.

Contract: `_serve_echo(argv)` (`--serve-echo K -- ...`, in a child process) serves grpc.aio bidi
streams with the edge's server options and handler shape, one method per `ECHO_VARIANTS` entry
under `ECHO_SERVICE`, each answering a K-block with its verdict and the handler's own time;
`echo_rounds(address, variant, k, rounds)` measures (round trip, handler time) per round from this
process with the client's channel options; `sample_messages(k)` is the block and verdict they carry.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gelato.deadline import within

ECHO_SERVICE = "gelato.bench.Echo"


ECHO_WORK_MS = 2.0  # `proto_work`: about a tiny-pair target forward
ECHO_VARIANTS = {
    "bare": "raw bytes, plain reads",
    "wait_for": "raw bytes, every read under `asyncio.wait_for` on both sides (a task per read on Python < 3.12)",
    "proto": "protobuf DeviceMessage / EdgeMessage (serialized, parsed), every read under a time limit as the edge "
    "and the client read (`gelato.deadline.within`: `asyncio.timeout` from 3.11): the real messaging",
    "proto_work": f"as proto, and the handler waits for {ECHO_WORK_MS:g} ms of torch work on a one-thread executor "
    "(as the edge's model thread): both processes go idle in between, as in a real round",
}

READ_LIMITS = {"bare": "none", "wait_for": "wait_for", "proto": "within", "proto_work": "within"}


async def _read(read: Awaitable[Any], limit: str, timeout_s: float) -> Any:
    """One read, as the variant reads: plain, under `asyncio.wait_for`, or as the edge and client do."""
    if limit == "wait_for":
        return await asyncio.wait_for(read, timeout_s)
    return await (within(read, timeout_s) if limit == "within" else read)


def sample_messages(k: int) -> tuple[Any, Any]:
    """A greedy K-draft block and its verdict, as the device and the edge send them."""
    from gelato.types import DraftBlock, Verdict
    from gelato.wire import encode_block, encode_verdict

    up = encode_block(DraftBlock(round=40, ids=tuple(range(1000, 1000 + k))))
    down = encode_verdict(Verdict(round=40, n_accepted=2, next_token=1234, queue_ms=0.1, compute_ms=3.0, batch_rows=1))
    return up, down


def _serve_echo(argv: list[str]) -> int:
    """`--serve-echo K -- ...`: grpc.aio bidi streams answering every message with a K-block's
    verdict, with the edge's server options and its handler's shape (an async generator reading
    `context.read()`), one method per `ECHO_VARIANTS` entry. Every reply carries the handler's own
    time (read returned -> reply yielded; in `compute_ms`, or as the first 8 bytes), so the client
    can tell transit from handling. Prints `listening on HOST:PORT`."""
    import struct
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import torch

    from gelato.channel import SERVER_OPTIONS
    from gelato.v1 import gelato_pb2 as pb

    torch.set_num_threads(1)
    _, down = sample_messages(int(argv[0]))
    pad = b"\x01" * max(0, down.ByteSize() - 8)
    fields = {f.name: v for f, v in down.verdict.ListFields()}
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="work")
    m = torch.ones(32, 32)

    def work(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            torch.mm(m, m)  # releases the GIL, as a model forward does

    def echo(limit: str, proto: bool, work_s: float = 0.0) -> Callable[..., Any]:
        async def session(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            loop = asyncio.get_running_loop()
            while True:
                data = await _read(context.read(), limit, 300.0)
                t0 = time.perf_counter()
                if data is grpc.aio.EOF:
                    return
                if proto:
                    pb.DeviceMessage.FromString(data)  # what the edge's handler parses per message
                if work_s:
                    await loop.run_in_executor(worker, work, work_s)
                handler_ms = (time.perf_counter() - t0) * 1e3
                if proto:
                    yield pb.EdgeMessage(verdict=pb.Verdict(**{**fields, "compute_ms": handler_ms}))
                else:
                    yield struct.pack("<d", handler_ms) + pad

        return session

    async def serve() -> int:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        ser = {"response_serializer": pb.EdgeMessage.SerializeToString}
        methods = {
            "bare": grpc.stream_stream_rpc_method_handler(echo("none", proto=False)),
            "wait_for": grpc.stream_stream_rpc_method_handler(echo("wait_for", proto=False)),
            "proto": grpc.stream_stream_rpc_method_handler(echo("within", proto=True), **ser),
            "proto_work": grpc.stream_stream_rpc_method_handler(echo("within", True, ECHO_WORK_MS / 1e3), **ser),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, methods),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"echo listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0)
        return 0

    return asyncio.run(serve())


async def echo_rounds(address: str, variant: str, k: int, rounds: int, warmup: int = 50) -> list[tuple[float, float]]:
    """(round trip, the server handler's own time) in seconds, per round through the echo server's
    `variant` over one bidi stream with the client's channel options: a K-block up, its verdict down."""
    import struct

    import grpc

    from gelato.channel import CLIENT_OPTIONS
    from gelato.v1 import gelato_pb2 as pb

    up, _ = sample_messages(k)
    method = f"/{ECHO_SERVICE}/{variant}"
    proto = variant.startswith("proto")
    async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        if proto:
            call = channel.stream_stream(
                method,
                request_serializer=pb.DeviceMessage.SerializeToString,
                response_deserializer=pb.EdgeMessage.FromString,
            )()
            payload: Any = up
        else:
            call = channel.stream_stream(method)()
            payload = up.SerializeToString()
        out = []
        for i in range(warmup + rounds):
            t0 = time.perf_counter()
            await call.write(payload)
            reply = await _read(call.read(), READ_LIMITS[variant], 120.0)
            rtt = time.perf_counter() - t0
            handler_ms = reply.verdict.compute_ms if proto else struct.unpack_from("<d", reply)[0]
            if i >= warmup:
                out.append((rtt, handler_ms / 1e3))
        await call.done_writing()
    return out
