"""Edge replicas and failover: a device pointed at three replicas (round_robin over one
gRPC target) keeps generating when the replica serving it is killed mid-generation, by re-opening
the session elsewhere with its accepted prefix — and the output is exactly the uninterrupted run's:
greedy token for token, sampling the same tokens for the same seed (draws keyed by position)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess

PROMPT = "Ava has 3 apples and Ben gives her 4 more. How many apples does Ava have now?"


def device_cmd(pair: dict[str, Path], target: str, trace: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", "--drafter", str(pair["drafter_agree"])]
    cmd += ["--edge", target, "--json", "--trace", str(trace), "--max-new-tokens", "300", "--prompt", PROMPT]
    return [*cmd, "--no-chat-template", "--connect-timeout-s", "5", *extra]


def busy_replica(edges: list[EdgeProcess]) -> EdgeProcess | None:
    for edge in edges:
        with grpc.insecure_channel(edge.address) as channel:
            if pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=5).active_sessions:
                return edge
    return None


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", [["--policy", "gelato"], ["--policy", "fixed-4", "--temperature", "0.8", "--seed", "2"]]
)
def test_killed_replica_mid_generation_changes_nothing(pair: dict[str, Path], tmp_path: Path, mode: list[str]) -> None:
    edges = [EdgeProcess(["--target", str(pair["target"])]) for _ in range(3)]
    try:
        reference = subprocess.run(
            device_cmd(pair, edges[0].address, tmp_path / "ref.jsonl", mode),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert reference.returncode == 0, reference.stderr
        ref = json.loads(reference.stdout)
        assert ref["n_tokens"] > 60, ref  # long enough to kill mid-way

        target = "ipv4:" + ",".join(e.address for e in edges)
        trace = tmp_path / "trace.jsonl"
        dev = subprocess.Popen(
            device_cmd(pair, target, trace, mode), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and dev.poll() is None:
            if trace.exists() and trace.read_text().count("\n") >= 3:
                victim = busy_replica(edges)
            time.sleep(0.01)
        assert victim is not None, "the device finished before a replica could be killed"
        victim.proc.send_signal(signal.SIGKILL)
        out, err = dev.communicate(timeout=300)
    finally:
        for e in edges:
            e.stop()
    assert dev.returncode == 0, err + out  # the record line says why a prompt failed
    rec = json.loads(out)
    assert rec["failovers"] == 1 and rec["stop_reason"] in ("eos", "max_new_tokens"), rec
    assert rec["token_ids"] == ref["token_ids"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_lone_edge_restarted_mid_generation_is_waited_for(pair: dict[str, Path], tmp_path: Path) -> None:
    """One edge, killed mid-generation and started again on its port a few seconds later (as a
    supervisor restarts it): the device's re-opens fail while it is gone (`--connect-timeout-s 1`:
    two attempts in ~2 s used up the failovers before), then it waits (`--edge-wait-s`) for the
    edge to answer ready and resumes: the output is the uninterrupted run's."""
    port = free_port()
    mode = ["--policy", "fixed-0", "--connect-timeout-s", "1", "--edge-wait-s", "60"]
    edge = EdgeProcess(["--target", str(pair["target"]), "--port", str(port)])
    try:
        reference = subprocess.run(
            device_cmd(pair, edge.address, tmp_path / "ref.jsonl", mode), capture_output=True, text=True, timeout=300
        )
        assert reference.returncode == 0, reference.stderr
        ref = json.loads(reference.stdout)
        trace = tmp_path / "trace.jsonl"
        dev = subprocess.Popen(
            device_cmd(pair, edge.address, trace, mode), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and dev.poll() is None:
            if trace.exists() and trace.read_text().count("\n") >= 3:
                break
            time.sleep(0.005)
        assert dev.poll() is None, "the device finished before the edge could be killed"
        edge.proc.send_signal(signal.SIGKILL)
        edge.stop()
        time.sleep(4.0)  # gone for longer than two re-opens take
        edge = EdgeProcess(["--target", str(pair["target"]), "--port", str(port)])
        out, err = dev.communicate(timeout=300)
    finally:
        edge.stop()
    assert dev.returncode == 0, err + out
    rec = json.loads(out)
    assert rec["failovers"] == 1 and rec["stop_reason"] in ("eos", "max_new_tokens"), rec
    assert rec["token_ids"] == ref["token_ids"]
    # The trace tells the sessions apart: rounds count from 0 again in the re-opened one.
    rounds = [json.loads(line) for line in trace.read_text().splitlines()]
    keys = [(r["session"], r["round"]) for r in rounds]
    assert len(set(keys)) == len(keys) and {s for s, _ in keys} == {0, 1}, keys
