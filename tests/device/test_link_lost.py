"""A connection lost under a read is named as the device's conclusion, not as a status the edge
sent: gRPC core ends the stream UNAVAILABLE "Stream removed (Socket closed)" when the edge process
dies, and the device's message said "edge answered UNAVAILABLE: ..." (the edge said nothing). The
code stays UNAVAILABLE, so the session still fails over. An edge's own UNAVAILABLE (loading,
shutting down) keeps its words. Checked against what real gRPC reports for a SIGKILLed server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc

from gelato.device.client_errors import call_error
from gelato.edge.service import SHUTDOWN_DETAILS
from gelato.wire import MODEL_LOADING

_SERVER = """
import asyncio, grpc
async def main():
    server = grpc.aio.server()
    async def echo(it, ctx):
        async for m in it:
            yield m
    h = grpc.method_handlers_generic_handler("t.T", {"E": grpc.stream_stream_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((h,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


def test_a_stream_whose_server_died_is_a_lost_connection_not_the_edges_words() -> None:
    async def run() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        server = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
        errors = []
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream("/t.T/E")()
                await call.write(b"x")
                assert await call.read() == b"x"
                os.kill(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
                # A verdict awaited when the stream was cut, then a stream that never connected
                # (a write there fails first, as `write_error` maps: here the read's own status).
                for stream in (call, channel.stream_stream("/t.T/E")()):
                    try:
                        await stream.read()
                    except grpc.aio.AioRpcError as exc:
                        errors.append(exc)
        finally:
            server.kill()
        return errors[0], errors[1]

    cut, refused = asyncio.run(run())
    for exc in (cut, refused):
        err = call_error(exc.code(), exc.details(), 3600.0)
        assert err.code == grpc.StatusCode.UNAVAILABLE, exc
        assert str(err).startswith("the connection to the edge was lost (gRPC: "), (str(err), exc.details())
        assert "edge answered" not in str(err)


def test_the_edges_own_unavailable_keeps_its_words() -> None:
    for details in (SHUTDOWN_DETAILS, MODEL_LOADING):
        err = call_error(grpc.StatusCode.UNAVAILABLE, details, 3600.0)
        assert str(err) == f"edge answered UNAVAILABLE: {details}" and err.code == grpc.StatusCode.UNAVAILABLE
