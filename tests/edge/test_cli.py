"""`gelato-edge` command line: every bad flag is a one-line usage error (exit 2), never a
traceback, and never a silently different setting (gRPC would bind a random port for 99999); settings
from the environment, failed loads and big-model placement (`--device-map`). What a running edge
serves is in test_cli_serving.py, how it stops in test_cli_shutdown.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def test_a_health_check_of_port_0_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--port 0 serves a free port no setting names: probing "port 0" reported the edge
    UNAVAILABLE (connection refused), exit 1, as if it were down."""
    from gelato.edge import cli

    assert cli.main(["--port", "0", "--health-check"]) == 2
    err = capsys.readouterr().err
    assert "--health-check without an address needs the --port the edge serves, not 0" in err, err
