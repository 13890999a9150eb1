"""How `gelato-edge` stops: `--shutdown-grace-s` cuts the drain of open streams, a signal while the
target loads stops it at once, and a forward still running at shutdown does not hold the process."""

from __future__ import annotations

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
from tests.edge.test_cli import free_port, run_edge


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_the_drain_at_once(pair: dict[str, Path], sig: signal.Signals) -> None:
    """Ctrl-C twice (or SIGTERM twice): the first starts the drain (a session held open gets its
    60 s of grace), the second exits at once, saying so, with 128 + the signal's number; the
    held session's device sees its stream end (and would fail over)."""
    import threading

    from gelato.models import load_model
    from gelato.types import PROTOCOL_VERSION

    fp = load_model(str(pair["target"]), "target", "float32", "cpu").fingerprint
    port = free_port()
    args = ["--port", str(port), "--target", str(pair["target"]), "--threads", "1", "--shutdown-grace-s", "60"]
    edge = [sys.executable, "-m", "gelato.edge.cli", *args]
    proc = subprocess.Popen(edge, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hold = threading.Event()

    def messages():  # type: ignore[no-untyped-def]
        request = pb.OpenSession(protocol_version=PROTOCOL_VERSION, tokenizer_fingerprint=fp, prefix_ids=[5, 6, 7])
        yield pb.DeviceMessage(open=request)
        hold.wait(90)  # the session stays open, sending nothing more

    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while "SERVING" not in run_edge("--health-check", f"127.0.0.1:{port}").stdout.replace("NOT_SERVING", ""):
            assert proc.poll() is None and time.monotonic() < deadline, "the edge never served"
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.GelatoStub(channel).Session(messages(), timeout=90)
            assert next(call).WhichOneof("kind") == "opened"
            proc.send_signal(sig)
            while "shutting down" not in (line := proc.stderr.readline()):
                assert line, "the edge ended before draining"
            assert "1 open session(s) get 60 s to finish" in line
            sent = time.monotonic()
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
            assert time.monotonic() - sent < 10 and proc.returncode == 128 + sig, err
            assert f"{sig.name} again: exiting now, without waiting for open sessions" in err, err
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        hold.set()
        proc.kill()
        proc.wait()
