"""gRPC channel and server options shared by both processes (keepalive that survives idle devices).

Contract: plain option lists, no I/O. Clients ping every 30 s even without calls; servers accept
such pings, so NATs and idle devices do not drop the connection. Plaintext clients add
`PLAINTEXT_OPTIONS` (no HTTP proxy). `host_port(host, port)` is an address as gRPC binds and dials
it: an IPv6 literal in brackets, given with them or not.
"""

from __future__ import annotations

# The largest legitimate message is an open carrying a long prompt (packed token ids, 3-4 bytes each:
# 4 MiB holds a million tokens) or a draft block with its sampled q (~200 KB at 32 drafts x 1024
# ids). Every message is parsed on the edge's event loop before any check, ~2.3 ms per MiB: a
# tighter bound keeps one client's garbage from stalling every session (16 MiB took ~37 ms).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The edge's `--max-draft-tokens` at most: a sampling block of this many drafts, each with the widest
# q the wire allows (1024 ids of up to 5 bytes and their 2-byte probabilities), is ~3.7 MB and fits
# MAX_MESSAGE_BYTES; a larger limit would let a device send a block gRPC refuses mid-generation.
MAX_DRAFT_TOKENS = 512

CLIENT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# Plaintext client channels bypass HTTP proxies (gRPC honours grpc_proxy / https_proxy / http_proxy
# for every target, loopback included): a proxy would read the bearer token, and a loopback edge is
# never behind one. TLS channels keep the proxy: the CONNECT tunnel carries TLS end to end.
PLAINTEXT_OPTIONS: list[tuple[str, int]] = [("grpc.enable_http_proxy", 0)]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 literal bracketed (`::` and `[::]` both give `[::]:P`; gRPC refuses
    `:::P` as a misformatted name)."""
    name = host.strip("[]")
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
