"""`gelato-edge` command line: every bad flag is a one-line usage error (exit 2), never a
traceback, and never a silently different setting (gRPC would bind a random port for 99999)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess, run_device
from tests.gelato.test_model_load_oom import placing_raises


def run_edge(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gelato.edge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_an_edge_prefilling_in_small_pieces_gives_the_same_tokens(pair: dict[str, Path], edge: EdgeProcess) -> None:
    """`--prefill-chunk-tokens 4`: every prompt is prefilled four tokens a forward, other sessions
    served in between; the devices get the tokens of an edge prefilling each prompt at once."""
    pieces = EdgeProcess(["--target", str(pair["target"]), "--prefill-chunk-tokens", "4"])
    try:
        expected = device_tokens(pair, edge.address)
        assert device_tokens(pair, pieces.address) == expected and all(expected)
    finally:
        assert pieces.stop() == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "99999"], "argument --port: port must be in 0-65535, got 99999"),
        (["--port", "x"], "argument --port: not a port number"),
        (["--metrics-port", "70000"], "argument --metrics-port: port must be in 0-65535"),
        (["--metrics-port", "0"], "--metrics-port must be >= 1 (0 would pick a port nobody is told)"),
        (["--health-port", "0"], "--health-port must be >= 1 (0 would pick a port nobody is told)"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
        (["--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--batch-window-ms", "-1"], "--batch-window-ms must be >= 0"),
        (["--kv-budget-mb", "-1"], "--kv-budget-mb must be >= 0"),
        (["--idle-timeout-s", "0"], "--idle-timeout-s must be > 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        # Values the wire cannot carry: refused at start, not failing every open or Info afterwards.
        (["--max-sessions", "4294967296"], "--max-sessions must be <= 4294967295 (it travels as a uint32)"),
        (["--max-draft-tokens", "513"], "--max-draft-tokens must be <= 512 (a sampling block of more drafts"),
        (["--max-ahead-rounds", "4294967296"], "--max-ahead-rounds must be <= 4294967295"),
        (["--kv-budget-mb", "1e300"], "--kv-budget-mb must be <= 1099511627776"),
    ],
)
def test_edge_bad_arguments(args: list[str], needle: str) -> None:
    res = run_edge("--port", "0", *args) if "--port" not in args else run_edge(*args)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_edge_bad_target(tmp_path: Path) -> None:
    res = run_edge("--port", "0", "--target", str(tmp_path / "nope"))
    assert res.returncode == 2 and "cannot load target" in res.stderr and "no such local folder" in res.stderr


def test_edge_target_out_of_memory_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gelato-edge --target BIG --device cuda` that runs out of GPU memory placing the target: the
    one-line load error (exit 2) with what to try, not torch's OutOfMemoryError as a traceback
    (exit 1). In process, the OOM simulated at the model's `.to()`."""
    import torch

    from gelato.edge import cli

    placing_raises(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."))
    assert cli.main(["--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot place target ") and err.count("\n") == 1, err
    assert "on cpu (float32): out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.); try " in err, err


def test_edge_any_failed_load_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A failure the loader does not foresee (here the KV pool set up over the loaded target)
    is still one line and exit 2, naming its type; the traceback goes to the log at DEBUG."""
    from gelato.edge import cli, server

    bug = RuntimeError("pool: expected a Tensor, got NoneType\nsecond line")

    def pool_model(loaded: Any) -> Any:
        raise bug

    monkeypatch.setattr(server, "pool_model", pool_model)
    caplog.set_level(logging.DEBUG, logger="gelato.edge")
    assert cli.main(["--port", "0", "--device", "cpu", "--log-level", "DEBUG"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: cannot load target (the embedded default): RuntimeError: pool: expected a Tensor, got NoneType "
        "(--log-level DEBUG logs the traceback)\n"
    ), err
    logged = [r for r in caplog.records if r.name == "gelato.edge" and r.exc_info]
    assert logged and logged[0].exc_info[1] is bug and logged[0].levelno == logging.DEBUG


def test_edge_metrics_port_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_edge("--port", "0", "--metrics-port", str(port))
    assert res.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in res.stderr


def test_edge_port_taken_by_another_edge(edge: EdgeProcess) -> None:
    """gRPC's default SO_REUSEPORT let a second edge bind the same port and print "listening":
    now it is a one-line error, and the first edge keeps serving alone."""
    host, port = edge.address.rsplit(":", 1)
    res = run_edge("--port", port, "--host", host)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"error: port {port} on {host} is in use", res.stderr
    assert "listening on" not in res.stdout
    with grpc.insecure_channel(edge.address) as channel:
        assert pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=10).vocab_size > 0


# --- settings from the environment (containers), health checks, drain, big-model placement ---------


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"GELATO_EDGE_PORT": "99999"}, "environment variable GELATO_EDGE_PORT='99999': port must be in 0-65535"),
        ({"GELATO_EDGE_MAX_SESSIONS": "many"}, "environment variable GELATO_EDGE_MAX_SESSIONS='many': invalid int"),
        (
            {"GELATO_EDGE_LOG_LEVEL": "loud"},
            "variable GELATO_EDGE_LOG_LEVEL='loud': invalid choice: 'LOUD'",
        ),
        ({"GELATO_EDGE_INSECURE": "maybe"}, "GELATO_EDGE_INSECURE='maybe': expected 1/0, true/false, yes/no or on/off"),
        ({"GELATO_EDGE_MAX_MEMORY": "cpu=lots"}, "GELATO_EDGE_MAX_MEMORY='cpu=lots': cpu: not a size: 'lots'"),
        ({"GELATO_EDGE_DEVICE_MAP": "everywhere"}, "GELATO_EDGE_DEVICE_MAP='everywhere': invalid choice"),
        ({"GELATO_EDGE_SHUTDOWN_GRACE_S": "-1"}, "--shutdown-grace-s must be >= 0"),
    ],
)
def test_edge_bad_environment(env: dict[str, str], needle: str) -> None:
    res = run_edge_env(env) if "GELATO_EDGE_PORT" in env else run_edge_env(env, "--port", "0")
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def run_edge_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gelato.edge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_edge_environment_sets_flags_and_command_line_wins(tmp_path: Path) -> None:
    """GELATO_EDGE_HOST reaches the security check (an exposed host without TLS is refused, so the
    variable was read); --host on the command line overrides it (the run goes on to the target,
    which is missing, so it fails there instead); an empty variable counts as unset."""
    exposed = run_edge_env({"GELATO_EDGE_HOST": "0.0.0.0"}, "--port", "0")
    assert exposed.returncode == 2 and "refusing to serve 0.0.0.0 without TLS and a token" in exposed.stderr
    env = {"GELATO_EDGE_HOST": "0.0.0.0", "GELATO_EDGE_TARGET": str(tmp_path / "nope"), "GELATO_EDGE_THREADS": ""}
    overridden = run_edge_env(env, "--port", "0", "--host", "127.0.0.1")
    assert overridden.returncode == 2 and "refusing" not in overridden.stderr
    assert f"cannot load target '{tmp_path / 'nope'}'" in overridden.stderr, overridden.stderr


def test_edge_help_names_every_variable() -> None:
    from gelato.edge.cli import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())  # unwrapped
    names = parser.env_names()  # type: ignore[attr-defined]
    assert names["--port"] == "GELATO_EDGE_PORT" and names["--kv-budget-mb"] == "GELATO_EDGE_KV_BUDGET_MB"
    assert "--health-check" not in names and "--help" not in names  # one-shot actions, not settings
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help", "--health-check"}
    assert set(names) == flags
    for name in names.values():
        assert f"[env: {name}]" in text, name
    assert "GELATO_EDGE_<OPTION>" in text


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def test_shutdown_grace_flag_cuts_the_drain(pair: dict[str, Path]) -> None:
    """`gelato.benchmarks.load.sigterm_phase` (quick, paced and stalled sessions, a late device) against
    an edge with --shutdown-grace-s 1: streams that outlive the grace end UNAVAILABLE with the edge's
    own shutdown message at 1 s (never INTERNAL: the edge ends a stream while its device waits for
    it, see `gelato.edge.server`), the edge exits 0 within 1 s + the interpreter's teardown, not
    after the default 5 s."""
    import asyncio

    from gelato.benchmarks.load import EXIT_SLACK_S, sigterm_phase
    from gelato.edge.service import SHUTDOWN_DETAILS
    from gelato.models import load_model

    target = load_model(str(pair["target"]), "target", "float32", "cpu")
    proc = EdgeProcess(["--target", str(pair["target"]), "--dtype", "float32", "--shutdown-grace-s", "1"])
    try:
        result = asyncio.run(sigterm_phase(proc, target.fingerprint, target.vocab_size, per_kind=1, grace_s=1.0))
    finally:
        proc.stop()
    assert not result["failures"], result
    assert result["edge_exit_code"] == 0 and result["edge_exit_after_s"] < 1.0 + EXIT_SLACK_S < 5.0, result
    cut = [s for s in result["streams"] if s["kind"] in ("paced", "stalled")]
    assert len(cut) == 2, result["streams"]
    for s in cut:
        assert s["code"] == "UNAVAILABLE" and s["details"] == SHUTDOWN_DETAILS[:200], cut
        assert 0.9 < s["ended_after_s"] < 2.0, cut
    assert "open session(s) get 1 s to finish" in proc.output()


SLOW_LOAD = """
import sys, time
import gelato.edge.server as server
load_model = server.load_model
def slow(*args, **kwargs):  # a checkpoint that takes a minute to load
    time.sleep(60)
    return load_model(*args, **kwargs)
server.load_model = slow
from gelato.edge.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_target_loads_stops_the_edge_at_once(pair: dict[str, Path], sig: signal.Signals) -> None:
    """Ctrl-C or a container's SIGTERM while the target loads: the edge exits 0 at once (no
    session can be open yet), it does not load to the end first."""
    port = free_port()
    args = ["--port", str(port), "--target", str(pair["target"]), "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "NOT_SERVING" not in run_edge("--health-check", f"127.0.0.1:{port}").stdout:  # listening, loading
            assert proc.poll() is None and time.monotonic() < deadline, "the edge never listened"
            time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and time.monotonic() - sent < 10, err
        assert "stopped while loading the target" in err and "listening on" not in err, err
    finally:
        proc.kill()
        proc.wait()


SLOW_PREFILL = """
import sys, time
from gelato.edge.sessions import TargetSession
prefill = TargetSession.prefill
def slow(self, *args):  # a prompt whose prefill takes a minute (a long prompt on a slow edge)
    time.sleep(60)
    return prefill(self, *args)
TargetSession.prefill = slow
from gelato.edge.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_forward_still_running_at_shutdown_does_not_hold_the_process(pair: dict[str, Path]) -> None:
    """SIGTERM while a session's prefill runs on the model thread: the drain ends its stream, and
    the process exits 0 soon after, naming the forward it did not wait for (the interpreter joined
    the model thread at exit: the whole prefill, past a container's stop timeout)."""
    from gelato.models import load_model
    from gelato.types import PROTOCOL_VERSION

    fp = load_model(str(pair["target"]), "target", "float32", "cpu").fingerprint
    port = free_port()
    args = ["--port", str(port), "--target", str(pair["target"]), "--threads", "1", "--shutdown-grace-s", "0.5"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREFILL, *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "SERVING" not in run_edge("--health-check", f"127.0.0.1:{port}").stdout.replace("NOT_SERVING", ""):
            assert proc.poll() is None and time.monotonic() < deadline, "the edge never served"
            time.sleep(0.2)
        request = pb.OpenSession(protocol_version=PROTOCOL_VERSION, tokenizer_fingerprint=fp, prefix_ids=[5, 6, 7])
        opening = pb.DeviceMessage(open=request)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GelatoStub(channel)
            call = stub.Session(iter([opening]), timeout=60)
            while stub.Info(pb.InfoRequest(), timeout=10).active_sessions < 1:  # admitted: prefill next
                assert time.monotonic() < deadline, "the session was never admitted"
                time.sleep(0.05)
            time.sleep(0.3)  # the prefill is on the model thread now
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=90)
            exit_s = time.monotonic() - sent
            with pytest.raises(grpc.RpcError):
                list(call)
        assert proc.returncode == 0 and exit_s < 10, (exit_s, err)
        assert "a forward is still running; exiting without waiting for it" in err, err
    finally:
        proc.kill()
        proc.wait()


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


def device_tokens(pair: dict[str, Path], address: str) -> list[list[int]]:
    args = ["--drafter", str(pair["drafter_agree"]), "--edge", address, "--json", "--max-new-tokens", "24"]
    res = run_device([*args, "--prompt", "Ava has 3 apples.", "--prompt", "A box holds 4 shells."])
    assert res.returncode == 0, res.stderr
    return [json.loads(line)["token_ids"] for line in res.stdout.splitlines()]


def test_device_map_spreads_the_target_over_cpu_and_disk(pair: dict[str, Path], tmp_path: Path) -> None:
    """accelerate places the target with 300 kB of CPU memory: the input embedding in memory, the
    layers and the head offloaded to disk (loaded per forward). Logits equal a plain load's, and an
    edge serving it gives the same greedy tokens as the plain edge, token for token."""
    import torch

    from gelato.edge.placement import model_kv_devices
    from gelato.models import load_model

    plain = load_model(str(pair["target"]), "target", "float32", "cpu")
    placed = load_model(
        str(pair["target"]),
        "target",
        "float32",
        device_map="sequential",
        max_memory={"cpu": 300_000},
        offload_folder=str(tmp_path / "offload"),
    )
    assert set(placed.model.hf_device_map.values()) == {"cpu", "disk"}, placed.model.hf_device_map
    assert set(model_kv_devices(placed.model)) == {torch.device("cpu")} and placed.device == torch.device("cpu")
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.inference_mode():
        assert torch.equal(plain.model(ids).logits, placed.model(ids).logits)

    reference = EdgeProcess(["--target", str(pair["target"]), "--dtype", "float32"])
    placement = ["--device-map", "sequential", "--max-memory", "cpu=300KB", "--offload-folder", str(tmp_path / "o")]
    offloaded = EdgeProcess(["--target", str(pair["target"]), "--dtype", "float32", *placement])
    try:
        expected = device_tokens(pair, reference.address)
        assert device_tokens(pair, offloaded.address) == expected
        assert len(expected) == 2 and all(expected)
        assert "--device-map sequential: layers (and their KV) run 2 on cpu" in offloaded.output()
    finally:
        assert offloaded.stop() == 0
        reference.stop()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-memory", "cpu=1GiB"], "--max-memory and --offload-folder need --device-map"),
        (["--device-map", "auto", "--device", "cpu"], "--device cpu and --device-map exclude each other"),
        (["--device-map", "auto", "--max-memory", "0=1GiB"], "--max-memory names GPU 0, but this host has 0 GPU(s)"),
        (["--device-map", "auto", "--max-memory", "tpu=1GiB"], "unknown device 'tpu'"),
        (["--device-map", "auto", "--max-memory", "cpu"], "expected DEVICE=SIZE[,DEVICE=SIZE...], got 'cpu'"),
        (["--device-map", "auto", "--max-memory", "cpu=1GB,cpu=2GB"], "device 'cpu' is given twice"),
        # (everything on disk is served: run on the CPU, tests/edge/test_kv_placement.py)
    ],
)
def test_device_map_errors(pair: dict[str, Path], args: list[str], needle: str) -> None:
    if "0=1GiB" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has a GPU 0")
    res = run_edge("--port", "0", "--target", str(pair["target"]), *args)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


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
