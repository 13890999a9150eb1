"""What a running `gelato-edge` serves besides sessions: health checks (`--health-check`, the health
port, the address probed), binding an IPv6 host, metrics kept on loopback when the edge is exposed, bind
addresses given without their port, and JSON logs of each session's open and end."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess, run_device
from tests.edge.test_cli import free_port, run_edge


def test_health_check_serving_and_unreachable(edge: EdgeProcess) -> None:
    ok = run_edge("--health-check", edge.address)
    assert ok.returncode == 0 and f"health {edge.address}: SERVING" in ok.stdout, ok.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    gone = run_edge("--health-check", f"127.0.0.1:{free}", "--health-check-timeout-s", "2")
    assert gone.returncode == 1 and f"health 127.0.0.1:{free}: UNAVAILABLE" in gone.stderr, gone.stderr
    bad = run_edge("--health-check", "nohost")
    assert bad.returncode == 2 and "argument --health-check: expected HOST:PORT" in bad.stderr


def test_health_check_not_serving() -> None:
    """A real gRPC health service that says NOT_SERVING (an edge still loading, or draining)."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        res = run_edge("--health-check", f"127.0.0.1:{port}")
        assert res.returncode == 1 and "NOT_SERVING" in res.stdout, res.stdout + res.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_edge("--health-check", f"127.0.0.1:{port}").returncode == 0
    finally:
        server.stop(0)


def test_health_port_serves_health_alone(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--health-port (set here through GELATO_EDGE_HEALTH_PORT, as the image does) serves the same
    status in plaintext and nothing else; `--health-check` with no address finds it."""
    port = free_port()
    monkeypatch.setenv("GELATO_EDGE_HEALTH_PORT", str(port))
    proc = EdgeProcess(["--target", str(pair["target"])])
    try:
        res = run_edge("--health-check")
        assert res.returncode == 0 and f"health 127.0.0.1:{port}: SERVING" in res.stdout, res.stdout + res.stderr
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Only Check: a Watch stream (never ending, no token on this port) is refused.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
            next(HealthStub(channel).Watch(HealthCheckRequest(service=""), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
        taken = run_edge("--port", "0", "--health-port", str(port))
        assert taken.returncode == 2 and f"--health-port {port} on 127.0.0.1 is in use" in taken.stderr
    finally:
        assert proc.stop() == 0


def test_health_check_asks_where_health_is_served(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--health-check` with no address asks --health-host:--health-port (127.0.0.2 here, another
    loopback address): once it always asked 127.0.0.1, so an edge serving health on any other
    address was reported unhealthy forever (and its container never became healthy)."""
    port = free_port()
    monkeypatch.setenv("GELATO_EDGE_HEALTH_PORT", str(port))
    monkeypatch.setenv("GELATO_EDGE_HEALTH_HOST", "127.0.0.2")
    proc = EdgeProcess(["--target", str(pair["target"])])
    try:
        res = run_edge("--health-check")
        assert res.returncode == 0 and f"health 127.0.0.2:{port}: SERVING" in res.stdout, res.stdout + res.stderr
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [
        ("0.0.0.0", 5, "127.0.0.1:5"),
        ("::", 5, "[::1]:5"),
        ("[::]", 5, "[::1]:5"),
        ("[::1]", 5, "[::1]:5"),
        ("10.1.2.3", 5, "10.1.2.3:5"),
        ("fe80::1", 5, "[fe80::1]:5"),
    ],
)
def test_probe_address(host: str, port: int, address: str) -> None:
    from gelato.edge.cli import probe_address

    assert probe_address(host, port) == address


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_binds_with_or_without_brackets(host: str) -> None:
    """`--host ::1` passed validation and then always failed to bind (gRPC refuses `::1:50051`);
    the metrics server takes the address without brackets. Both forms serve."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gelato.edge.config import EdgeConfig
    from gelato.edge.metrics import EdgeMetrics
    from gelato.edge.server import EdgeServer

    async def scenario() -> int:
        server = EdgeServer(EdgeConfig(host=host, port=0))
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"[::1]:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                return int(reply.status)
        finally:
            await server.stop(0)

    assert asyncio.run(scenario()) == health_pb2.HealthCheckResponse.NOT_SERVING
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        free = s.getsockname()[1]
    EdgeMetrics().serve(host, free)
    assert answers_http("::1", free)


def answers_http(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return b"gelato_edge_sessions_active" in s.makefile("rb").read()
    except OSError:
        return False


def test_metrics_stay_on_loopback_when_the_edge_is_exposed(
    pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host 0.0.0.0 (as in the image) exposes the TLS/token-guarded gRPC port only: metrics, in
    plaintext and without a token, stay on --metrics-host (default 127.0.0.1). 127.0.0.2 stands for
    another interface: a 0.0.0.0 listener answers there, a 127.0.0.1 one does not. Asked for
    (GELATO_EDGE_METRICS_HOST=0.0.0.0, as a container scraped from outside would set it), they
    are exposed, whatever --host is."""
    port = free_port()
    args = ["--target", str(pair["target"]), "--metrics-port", str(port)]
    exposed = EdgeProcess([*args, "--host", "0.0.0.0", "--insecure"])
    try:
        assert answers_http("127.0.0.1", port)
        assert not answers_http("127.0.0.2", port)
    finally:
        assert exposed.stop() == 0
    port = free_port()
    monkeypatch.setenv("GELATO_EDGE_METRICS_HOST", "0.0.0.0")
    scraped = EdgeProcess(["--target", str(pair["target"]), "--metrics-port", str(port)])
    try:
        assert answers_http("127.0.0.2", port)
    finally:
        assert scraped.stop() == 0
    out = scraped.output()  # exposed on purpose, and said so at start (the loopback edge said nothing)
    assert f"warning: metrics on 0.0.0.0:{port} (--metrics-host) are plaintext and need no token" in out, out
    assert "GELATO_EDGE_METRICS_HOST='0.0.0.0'" in out and "metrics on" not in exposed.output()


def test_json_logs_carry_each_sessions_open_and_end(pair: dict[str, Path]) -> None:
    """`--log-format json` (both CLIs): one JSON object per log line, a collector's input. At INFO
    the edge logs each session's open and end with their numbers as fields; the device's lines
    (here: which meter `auto` took) are JSON too."""
    edge = EdgeProcess(["--target", str(pair["target"]), "--log-level", "info", "--log-format", "json"])
    try:
        args = ["--drafter", str(pair["drafter_agree"]), "--edge", edge.address, "--json", "--max-new-tokens", "24"]
        args += ["--log-level", "info", "--log-format", "json", "--prompt", "Ava has 3 apples.", "--prompt", "Bo"]
        res = run_device(args)
        assert res.returncode == 0, res.stderr
    finally:
        assert edge.stop() == 0
    lines = [line for line in edge.output().splitlines() if line.strip()]
    # Every line a JSON record but the one on stdout naming the address (the shutdown's status too).
    assert all(line.startswith("{") for line in lines if " listening on " not in line), lines
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    assert any("shutting down" in r["message"] for r in records)
    opened = [r for r in records if r.get("event") == "session_open"]
    ended = [r for r in records if r.get("event") == "session_end"]
    assert len(opened) == len(ended) == 2, records
    assert [r["session"] for r in opened] == [r["session"] for r in ended]
    assert all(r["prompt_tokens"] > 0 and r["max_new_tokens"] == 24 and r["sampling"] == "greedy" for r in opened)
    tokens = [len(json.loads(line)["token_ids"]) for line in res.stdout.splitlines()]
    assert [(r["outcome"], r["tokens"]) for r in ended] == [("OK", n) for n in tokens] and all(tokens)
    device_lines = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert any(r["logger"] == "gelato.power" and r["level"] == "INFO" for r in device_lines), res.stderr


def test_a_bind_address_without_its_port_is_said(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """GELATO_EDGE_METRICS_HOST=0.0.0.0 alone (what the image's notes ask for, without the port)
    serves no metrics: the edge says so at start, naming the variable, instead of nothing."""
    from tests.conftest import EdgeProcess

    monkeypatch.setenv("GELATO_EDGE_METRICS_HOST", "0.0.0.0")
    edge = EdgeProcess(["--target", str(pair["target"]), "--health-host", "127.0.0.2"])
    edge.stop()
    out = edge.output()
    assert (
        "warning: --metrics-host 0.0.0.0 without --metrics-port serves nothing "
        "(--metrics-host came from GELATO_EDGE_METRICS_HOST='0.0.0.0')"
    ) in out, out
    assert "warning: --health-host 127.0.0.2 without --health-port serves nothing" in out, out
