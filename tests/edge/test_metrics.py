"""The edge's Prometheus metrics (`gelato.edge.metrics.EdgeMetrics`): labelled series a dashboard or a
test reads exist from the start, at 0, rather than appearing only once their first event happens."""

from __future__ import annotations

from prometheus_client import generate_latest

from gelato.edge.metrics import EdgeMetrics


def test_send_ahead_outcomes_are_exported_before_any_happens() -> None:
    m = EdgeMetrics()
    text = generate_latest(m.registry).decode()
    assert 'gelato_edge_ahead_blocks_total{outcome="hit"} 0.0' in text
    assert 'gelato_edge_ahead_blocks_total{outcome="stale"} 0.0' in text
    m.ahead_blocks.labels("stale").inc()
    assert 'gelato_edge_ahead_blocks_total{outcome="stale"} 1.0' in generate_latest(m.registry).decode()
