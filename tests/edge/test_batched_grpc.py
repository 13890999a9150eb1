"""Batching through real gRPC: concurrent sessions share forwards, outputs stay unbatched-exact;
KV-budget admission; idle expiry; no leak after many open/cancel cycles; metrics endpoint."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from gelato.device.client import EdgeClient
from gelato.device.drafter import Drafter
from gelato.device.policy import FixedK
from gelato.models import LoadedModel, encode_prompt
from gelato.types import PROTOCOL_VERSION, SamplingParams
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def generate_all(
    address: str, loaded: LoadedModel, prompts: list[str], params: list[SamplingParams], ks: list[int]
) -> list[list[int]]:
    """One async client per session, all running concurrently against one edge."""

    async def one(text: str, p: SamplingParams, k: int) -> list[int]:
        client = EdgeClient(address)
        try:
            ids = encode_prompt(loaded.tokenizer, text)
            res = await client.generate(Drafter(loaded, p), ids, 24, FixedK(k))
            return res.token_ids
        finally:
            await client.close()

    return list(await asyncio.gather(*(one(t, p, k) for t, p, k in zip(prompts, params, ks, strict=True))))


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def scrape_when_idle(port: int, timeout_s: float = 10.0) -> dict[str, float]:
    """Metrics once the edge has freed the finished sessions' KV: a stream ends at the client
    before the edge's model thread has given its slot back."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(port)
        if m["gelato_edge_sessions_active"] == 0 == m["gelato_edge_kv_pool_bytes"] or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_concurrent_sessions_batch_and_match_solo(
    pair: dict[str, Path], drafter_model: LoadedModel, prompts: list[str], temperature: float
) -> None:
    metrics_port = free_port()
    edge = EdgeProcess(
        ["--target", str(pair["target"]), "--batch-window-ms", "20", "--metrics-port", str(metrics_port)]
    )
    try:
        n = 8
        params = [SamplingParams(temperature=temperature, top_k=50, seed=i) for i in range(n)]
        ks = [1, 2, 3, 4, 5, 6, 8, 0]
        together = asyncio.run(generate_all(edge.address, drafter_model, prompts[:n], params, ks))
        m = scrape_when_idle(metrics_port)
        assert m["gelato_edge_batch_rows_total"] / m["gelato_edge_batches_total"] > 1.5, m
        assert m["gelato_edge_sessions_active"] == 0
        assert m["gelato_edge_kv_bytes"] == 0 == m["gelato_edge_kv_pool_bytes"]  # an idle edge holds no KV
        assert m["gelato_edge_tokens_drafted_total"] >= m["gelato_edge_tokens_accepted_total"] > 0
        assert m["gelato_edge_verify_seconds_count"] == m["gelato_edge_batches_total"]
        solo = [
            asyncio.run(generate_all(edge.address, drafter_model, [t], [p], [k]))[0]
            for t, p, k in zip(prompts[:n], params, ks, strict=True)
        ]
        assert together == solo
    finally:
        edge.stop()


def open_msg(fp: str, prefix_len: int, max_new: int) -> pb.DeviceMessage:
    return pb.DeviceMessage(
        open=pb.OpenSession(
            protocol_version=PROTOCOL_VERSION,
            tokenizer_fingerprint=fp,
            drafter_model="t",
            prefix_ids=[3] * prefix_len,
            max_new_tokens=max_new,
        )
    )


def test_kv_budget_idle_expiry_and_no_leak(pair: dict[str, Path], drafter_model: LoadedModel) -> None:
    # The test target: 2 layers x 2 kv heads x 16 dims x 2 (k, v) x 4 bytes = 512 bytes per token.
    edge = EdgeProcess(
        ["--target", str(pair["target"]), "--kv-budget-mb", str(300 * 512 / 2**20), "--idle-timeout-s", "1"]
    )
    fp = drafter_model.fingerprint
    try:
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GelatoStub(channel)
            # 10 + 400 + 33 tokens > 300 reserved: refused; existing sessions unaffected.
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Session(iter([open_msg(fp, 10, 400)]), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "KV budget" in (info.value.details() or "")

            # Idle expiry: a device that opens and then goes silent is freed.
            def silent() -> object:
                yield open_msg(fp, 10, 100)
                time.sleep(4)

            call = stub.Session(silent(), timeout=30)
            assert next(call).WhichOneof("kind") == "opened"
            assert stub.Info(pb.InfoRequest(), timeout=5).active_sessions == 1
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle" in (info.value.details() or "")
            assert stub.Info(pb.InfoRequest(), timeout=5).active_sessions == 0

            # 200 open/cancel cycles leave nothing behind.
            for i in range(200):
                call = stub.Session(
                    iter([open_msg(fp, 5 + i % 7, 50), pb.DeviceMessage(draft=pb.DraftBlock(round=0, ids=[4, 5]))]),
                    timeout=30,
                )
                next(call)
                if i % 2:
                    next(call)
                call.cancel()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                info_resp = stub.Info(pb.InfoRequest(), timeout=5)
                if info_resp.active_sessions == 0 and info_resp.kv_pool_bytes == 0:  # slots free on the model thread
                    break
                time.sleep(0.1)
            assert info_resp.active_sessions == 0
            assert info_resp.kv_bytes_in_use == 0 and info_resp.kv_bytes_reserved == 0
            assert info_resp.kv_pool_bytes == 0
            assert info_resp.kv_budget_bytes == 300 * 512
            # ... and the edge still serves a whole session within its budget.
            out = list(
                stub.Session(
                    iter([open_msg(fp, 10, 100), pb.DeviceMessage(draft=pb.DraftBlock(round=0, ids=[4]))]), timeout=30
                )
            )
            assert out[1].verdict.round == 0
    finally:
        assert edge.stop() == 0


def test_metrics_names(pair: dict[str, Path]) -> None:
    port = free_port()
    edge = EdgeProcess(["--target", str(pair["target"]), "--metrics-port", str(port)])
    try:
        names = set(scrape(port))
        for name in [
            "gelato_edge_sessions_active",
            "gelato_edge_batches_total",
            "gelato_edge_batch_rows_total",
            "gelato_edge_verify_seconds_count",
            "gelato_edge_tokens_accepted_total",
            "gelato_edge_tokens_drafted_total",
            "gelato_edge_kv_bytes",
            "gelato_edge_kv_pool_bytes",
        ]:
            assert name in names, json.dumps(sorted(names))
    finally:
        edge.stop()
