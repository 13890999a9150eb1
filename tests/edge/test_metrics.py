"""The edge's Prometheus metrics (`gelato.edge.metrics.EdgeMetrics`): labelled series a dashboard or a
test reads exist from the start, at 0, rather than appearing only once their first event happens;
the session gauges are read from the registry at scrape time."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import generate_latest

from gelato.edge.config import EdgeConfig
from gelato.edge.metrics import EdgeMetrics
from gelato.edge.service import GelatoService
from gelato.models import LoadedModel
from gelato.types import SamplingParams


def test_send_ahead_outcomes_are_exported_before_any_happens() -> None:
    m = EdgeMetrics()
    text = generate_latest(m.registry).decode()
    assert 'gelato_edge_ahead_blocks_total{outcome="hit"} 0.0' in text
    assert 'gelato_edge_ahead_blocks_total{outcome="stale"} 0.0' in text
    m.ahead_blocks.labels("stale").inc()
    assert 'gelato_edge_ahead_blocks_total{outcome="stale"} 1.0' in generate_latest(m.registry).decode()


def test_refusal_reasons_are_exported_before_any_happens() -> None:
    m = EdgeMetrics()
    text = generate_latest(m.registry).decode()
    for reason in ("admission", "kv_memory", "waiting_streams"):
        assert f'gelato_edge_sessions_rejected_total{{reason="{reason}"}} 0.0' in text


def test_a_close_that_fails_on_the_model_thread_is_logged(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A session's close runs on the model thread and nobody awaits it: when the pool cannot take
    the shape the release asks for, the error is logged with the session's id, not lost in a
    future; the slot is free all the same."""
    service = GelatoService(EdgeConfig())
    try:
        session = service.registry.admit(target, SamplingParams(), [5, 6, 7, 8], 16)
        service.executor.submit(session.prefill).result()
        pool = session.seq.pool

        def fails(strict: bool = False) -> None:
            raise RuntimeError("simulated: the pool could not be reshaped")

        monkeypatch.setattr(pool, "apply_target", fails)
        with caplog.at_level(logging.ERROR, logger="gelato.edge"):
            service.registry.release(session.session_id)
            service.executor.submit(lambda: None).result()  # after the close
        assert session.seq.closed and not pool._owners
        [record] = [r for r in caplog.records if "closing it on the model thread failed" in r.getMessage()]
        assert session.session_id in record.getMessage() and record.exc_info is not None
        assert "simulated: the pool could not be reshaped" in str(record.exc_info[1])
    finally:
        service.executor.shutdown(wait=True)


def test_session_gauges_are_read_at_scrape_time(target: LoadedModel) -> None:
    """Sessions and their KV are gauges read from the registry when scraped (nothing is set per
    verdict): a session admitted and prefilled shows at once, and is gone once released."""
    service = GelatoService(EdgeConfig())
    try:

        def sample(name: str) -> float | None:
            return service.metrics.registry.get_sample_value(name)

        assert sample("gelato_edge_sessions_active") == 0 == sample("gelato_edge_kv_bytes")
        session = service.registry.admit(target, SamplingParams(), [5, 6, 7, 8], 16)
        session.prefill()
        assert sample("gelato_edge_sessions_active") == 1
        assert sample("gelato_edge_kv_bytes") == session.kv_bytes() > 0
        service.registry.release(session.session_id)
        assert sample("gelato_edge_sessions_active") == 0 == sample("gelato_edge_kv_bytes")
    finally:
        service.executor.shutdown(wait=True)
