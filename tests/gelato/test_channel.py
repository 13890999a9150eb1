"""gRPC options both processes share (`gelato.channel`): keepalive that survives idle devices, the
message limit, addresses as gRPC binds them."""

from __future__ import annotations

import pytest

from gelato.channel import CLIENT_OPTIONS, MAX_MESSAGE_BYTES, SERVER_OPTIONS, host_port


def test_keepalive_settings_agree() -> None:
    """A client pinging more often than the server accepts is sent GOAWAY (too_many_pings) and its
    device loses its session: the client's interval is at least the server's floor, pings without
    calls are allowed on both sides, and both enforce the same message limit."""
    client, server = dict(CLIENT_OPTIONS), dict(SERVER_OPTIONS)
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0  # pings go on while the device is idle
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        assert client[key] == server[key] == MAX_MESSAGE_BYTES


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [("127.0.0.1", 5, "127.0.0.1:5"), ("::1", 5, "[::1]:5"), ("[::]", 7, "[::]:7"), ("edge", 9, "edge:9")],
)
def test_host_port(host: str, port: int, address: str) -> None:
    assert host_port(host, port) == address
