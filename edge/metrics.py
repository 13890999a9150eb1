"""Prometheus metrics of the edge.

Contract: `EdgeMetrics()` owns its own registry (several servers in one process, as in tests, do
not collide); `serve(host, port)` exposes it over plain HTTP without authentication, so
`gelato-edge` binds it to `--metrics-host` (default 127.0.0.1), not to the gRPC `--host`. Names are a public contract:
`gelato_edge_sessions_active`, `gelato_edge_batches_total`, `gelato_edge_batch_rows_total`
(rows / batches = mean batch size), `gelato_edge_verify_seconds` (histogram of a batch's
forward + acceptance), `gelato_edge_tokens_accepted_total`, `gelato_edge_tokens_drafted_total`,
`gelato_edge_sessions_rejected_total{reason="admission"|"client_limit"|"kv_memory"|"waiting_streams"}`
(opens refused for lack of room: `--max-sessions` or `--kv-budget-mb`; the client's own
`--max-sessions-per-client`; no device memory for its KV or its prefill; too many streams waiting
to open), `gelato_edge_kv_bytes`,
`gelato_edge_kv_pool_bytes`, `gelato_edge_ahead_blocks_total{outcome="hit"|"stale"}` (send-ahead
blocks verified / answered stale; one that fails is neither).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REJECT_REASONS = ("admission", "client_limit", "kv_memory", "waiting_streams")


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions_active = Gauge(
            "gelato_edge_sessions_active",
            "Device sessions holding a KV reservation: open, or admitted and still prefilling",
            registry=r,
        )
        self.batches = Counter("gelato_edge_batches", "Target forwards that verified draft blocks", registry=r)
        self.batch_rows = Counter("gelato_edge_batch_rows", "Draft blocks verified, over all batches", registry=r)
        self.verify_seconds = Histogram(
            "gelato_edge_verify_seconds",
            "Wall time of one batched verify step (forward + acceptance)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.tokens_accepted = Counter("gelato_edge_tokens_accepted", "Draft tokens accepted", registry=r)
        self.tokens_drafted = Counter(
            "gelato_edge_tokens_drafted", "Draft tokens verified (failed and stale blocks not counted)", registry=r
        )
        self.sessions_rejected = Counter(
            "gelato_edge_sessions_rejected", "Session opens refused for lack of room, by reason", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.sessions_rejected.labels(reason)
        self.kv_bytes = Gauge("gelato_edge_kv_bytes", "Target KV bytes of open sessions' tokens", registry=r)
        self.kv_pool_bytes = Gauge(
            "gelato_edge_kv_pool_bytes", "Target KV pool memory allocated (all slots at its context)", registry=r
        )

        self.ahead_blocks = Counter("gelato_edge_ahead_blocks", "Send-ahead blocks by outcome", ["outcome"], registry=r)
        for outcome in ("hit", "stale"):  # exported at 0 from the start, not only once one happens
            self.ahead_blocks.labels(outcome)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host.strip("[]"), registry=self.registry)  # IPv6 without brackets here
