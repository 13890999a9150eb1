"""`gelato-edge` command line: every bad flag is a one-line usage error (exit 2), never a
traceback, and never a silently different setting (gRPC would bind a random port for 99999)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess


def run_edge(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "99999"], "argument --port: port must be in 0-65535, got 99999"),
        (["--port", "x"], "argument --port: not a port number"),
        (["--metrics-port", "70000"], "argument --metrics-port: port must be in 0-65535"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
        (["--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--batch-window-ms", "-1"], "--batch-window-ms must be >= 0"),
        (["--kv-budget-mb", "-1"], "--kv-budget-mb must be >= 0"),
        (["--idle-timeout-s", "0"], "--idle-timeout-s must be > 0"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_edge_bad_arguments(args: list[str], needle: str) -> None:
    res = run_edge("--port", "0", *args) if "--port" not in args else run_edge(*args)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_edge_bad_target(tmp_path: Path) -> None:
    res = run_edge("--port", "0", "--target", str(tmp_path / "nope"))
    assert res.returncode == 2 and "cannot load target" in res.stderr and "no such local folder" in res.stderr


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
