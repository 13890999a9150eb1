"""Benchmark child processes start without the caller's `GELATO_DEVICE_*` / `GELATO_EDGE_*` settings
(`gelato.benchmarks.procs.child_env`): `gelato-device` and `gelato-edge` read every flag from such a
variable, so one left in the user's shell would change runs the benchmark records as something else.
The spawn sites are checked with `subprocess.Popen` / `subprocess.run` replaced (no model runs), and
every other spawn in benchmarks/ is checked to pass `env=` unless it runs a plain tool (git, ip, ...)."""

from __future__ import annotations

import ast
import io
import queue
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from gelato.benchmarks import procs

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LEAKS = {"GELATO_DEVICE_PIPELINE": "local", "GELATO_EDGE_TARGET": "/elsewhere/model"}
KEPT = {"GELATO_TORCH": "cpu", "CUDA_VISIBLE_DEVICES": "3", "GELATO_GSM8K_DIR": "/data"}


@pytest.fixture
def leaky_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**LEAKS, **KEPT}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(procs, "_reported", set())  # each test sees its own first report


def assert_clean(env: dict[str, str] | None) -> None:
    assert env is not None, "spawned with the caller's whole environment"
    assert not [k for k in env if k.startswith(("GELATO_DEVICE_", "GELATO_EDGE_"))]
    assert all(env.get(k) == v for k, v in KEPT.items()) and "PATH" in env


class FakePopen:
    """A child that printed `listening on` and exited; records the env it was given."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, cmd: list[str], **kw: Any) -> None:
        FakePopen.calls.append({"cmd": cmd, **kw})
        self.stdout = io.StringIO("listening on 127.0.0.1:5\n")
        self.returncode = 0
        self.pid = 1

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


@pytest.fixture
def popen(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    FakePopen.calls = []
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    return FakePopen.calls


@pytest.fixture
def run_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append({"cmd": cmd, **kw})
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="not run")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


def test_child_env_drops_device_and_edge_settings_and_keeps_the_rest(
    leaky_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    env = procs.child_env()
    assert_clean(env)
    err = capsys.readouterr().err
    assert err == ("ignoring GELATO_DEVICE_PIPELINE, GELATO_EDGE_TARGET: a benchmark's runs are set by its own flags\n")
    assert_clean(procs.child_env())
    assert capsys.readouterr().err == ""  # said once per process, not per child
    given = {"GELATO_EDGE_PORT": "1", "GELATO_DEVICEX": "kept", "PATH": "/bin"}
    assert procs.child_env(given) == {"GELATO_DEVICEX": "kept", "PATH": "/bin"}
    assert capsys.readouterr().err == ""  # an explicit mapping is not this process's environment


def test_nothing_said_when_nothing_dropped(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for k in [k for k in __import__("os").environ if k.startswith(("GELATO_DEVICE_", "GELATO_EDGE_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(procs, "_reported", set())
    procs.child_env()
    assert capsys.readouterr().err == ""


def test_edge_and_device_processes_get_the_clean_env(
    leaky_env: None, popen: list[dict[str, Any]], run_calls: list[dict[str, Any]]
) -> None:
    edge = procs.start_edge(["--threads", "1"], timeout_s=5)
    assert edge.address == "127.0.0.1:5" and edge.stop() == 0
    with pytest.raises(RuntimeError, match="gelato-device failed"):
        procs.run_device(["--prompt", "x"])
    assert popen[0]["cmd"][1:3] == ["-m", "gelato.edge.cli"] and run_calls[0]["cmd"][1:3] == ["-m", "gelato.device.cli"]
    for call in (*popen, *run_calls):
        assert_clean(call.get("env"))


def test_gsm8k_fleet_devices_get_the_clean_env(leaky_env: None, popen: list[dict[str, Any]], tmp_path: Path) -> None:
    from gelato.benchmarks.bench_run import Fleet, RunSpec

    fleet = Fleet([[]], ["--edge", "h:1"], [tmp_path / "d0.jsonl"], tmp_path)
    cmd = fleet.command(RunSpec("fixed-2", "fixed-2", "fixed"), 0, tmp_path / "t.jsonl")
    lines: queue.Queue[tuple[int, str] | None] = queue.Queue()
    fleet._start(cmd, tmp_path / "err", 0, lines).wait()
    assert popen[0]["cmd"] == cmd
    assert_clean(popen[0].get("env"))


def test_policies_devices_get_the_clean_env(leaky_env: None, run_calls: list[dict[str, Any]], tmp_path: Path) -> None:
    from gelato.benchmarks.policies import Bench, RunSpec, build_parser

    bench = object.__new__(Bench)  # no edge, no proxy: only the device's spawn
    bench.args = build_parser().parse_args(["--data", "q.jsonl"])
    bench.device_prefix, bench.proxy = [], SimpleNamespace(address="127.0.0.1:1")
    bench.traces, bench.labels = tmp_path, {}
    with pytest.raises(RuntimeError, match="gelato-device fixed-2 failed"):
        bench.run(RunSpec("fixed-2", "fixed-2", "fixed"))
    assert "gelato.device.cli" in run_calls[0]["cmd"]
    assert_clean(run_calls[0].get("env"))


def test_proxy_channel_and_fault_devices_get_the_clean_env(
    leaky_env: None, popen: list[dict[str, Any]], tmp_path: Path
) -> None:
    from gelato.benchmarks.channel import Listener
    from gelato.benchmarks.delay_proxy import ProxyProcess
    from gelato.benchmarks.load_faults import _start_device

    ProxyProcess("127.0.0.1:2", 1.0, timeout_s=5).stop()
    Listener(["python", "-m", "gelato.benchmarks.channel_probe", "server"], timeout_s=5).stop()
    _start_device("127.0.0.1:2", "drafter", 0, tmp_path, 0.1)
    assert len(popen) == 3
    for call in popen:
        assert_clean(call.get("env"))


def test_demo_names_the_radio_model_it_passes() -> None:
    from gelato.benchmarks.demo import build_parser, check_args, device_args, energy_lines

    args = build_parser().parse_args([])
    flags = device_args("d", "h:1", Path("p"), 8, "gelato", args.meter, args.radio)
    assert flags[flags.index("--radio") + 1] == args.radio == "wifi"
    assert "+ wifi radio model" in energy_lines([{"energy": ["cpu-model (estimated)"]}], args.radio)[0]
    lte = build_parser().parse_args(["--radio", "lte"])
    assert device_args("d", "h:1", Path("p"), 8, "gelato", lte.meter, lte.radio)[-4:-2] == ["--radio", "lte"]
    assert "+ lte radio model" in energy_lines([{"energy": ["cpu-model (estimated)"]}], "lte")[0]
    assert "+ no radio model" in energy_lines([{"energy": ["cpu-model (estimated)"]}], "none")[0]
    assert check_args(build_parser().parse_args(["--radio", "radar"])).startswith("--radio: unknown radio")


# ---------------------------------------------------------------- every other spawn site

SPAWNS = {
    "subprocess": {"Popen", "run", "call", "check_output", "check_call"},
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
}
TOOLS = ("[*git", '["git"', '["which"', "status")  # plain tools (git, which): no gelato setting to leak


def _spawns_without_env(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    src = path.read_text()
    bad = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            f = call.func
            if not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)):
                continue
            if f.attr not in SPAWNS.get(f.value.id, set()):
                continue
            if any(kw.arg == "env" for kw in call.keywords):
                continue
            first = ast.get_source_segment(src, call.args[0]) if call.args else ""
            if (first or "").startswith(TOOLS) or (path.name == "channel.py" and fn.name == "run"):
                continue
            bad.append(f"{path.name}:{call.lineno} in {fn.name}")
    return bad


def test_every_benchmark_spawn_passes_an_env() -> None:
    """Anything in benchmarks/ that starts a process passes `env=` (child_env), except plain tools:
    git, which, and channel.py's `run`, which only ever runs `ip` (checked here too)."""
    bad = [b for path in sorted(BENCHMARKS.glob("*.py")) for b in _spawns_without_env(path)]
    assert not bad, f"spawned without env=child_env(): {bad}"
    channel = (BENCHMARKS / "channel.py").read_text()
    calls = [n for n in ast.walk(ast.parse(channel)) if isinstance(n, ast.Call)]
    plain = [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "run"]
    assert plain and all(
        isinstance(c.args[0], ast.List)
        and isinstance(c.args[0].elts[0], ast.Constant)
        and c.args[0].elts[0].value == "ip"
        for c in plain
    )
    uses = sum(p.read_text().count("child_env()") for p in BENCHMARKS.glob("*.py"))
    assert uses >= 8  # procs (edge, device), bench_run, policies, load_faults, delay_proxy, channel (2)
