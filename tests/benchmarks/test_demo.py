"""The README's first command, `gelato-demo`: real edge and device processes, a results table with
device energy named by source, and a losslessness check that can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gelato.benchmarks.demo import device_j_per_token, lossless_reference, main, mismatches


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "gelato.benchmarks.demo", "--pair", "random", "--prompts", "2"]
    # Names with spaces around them are the names (ar-device's output is not checked against the
    # target's, whatever its spelling).
    cmd += ["--max-new-tokens", "12", "--policies", "fixed-0, ar-device, fixed-3", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| fixed-3 | 2 | 24 |" in res.stdout  # 2 prompts x 12 tokens
    assert "checked token for token against fixed-0's: identical" in res.stdout
    assert "Every edge-verified row's outputs were checked" in res.stdout  # not ar-device's: "Every row's" was wrong
    # Strict JSON (NaN is no JSON value: other parsers refuse the file).
    rows = {r["policy"]: r for r in json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))}
    assert rows["fixed-0"]["rounds"] == 24 and rows["fixed-3"]["mean_draft_len"] == 3.0
    # Nothing drafted (fixed-0), or no target checked the drafts (ar-device): no acceptance.
    assert rows["fixed-0"]["acceptance"] is None and rows["ar-device"]["acceptance"] is None
    assert 0 <= rows["fixed-3"]["acceptance"] <= 1
    for row in rows.values():
        assert row["energy_j_per_token"] > 0  # some meter always answers here: at least cpu-model
        assert all(e.endswith(("(measured)", "(estimated)")) for e in row["energy"])


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="reads child processes from /proc/PID/task/TID/children (Linux, CONFIG_PROC_CHILDREN)",
)
def test_sigterm_stops_the_demos_edge(tmp_path: Path) -> None:
    """SIGTERM to the demo (`timeout`, a cancelled CI job) while a device runs: the demo exits
    143 and its edge is stopped, not left running with its model loaded."""
    import os
    import signal
    import time

    cmd = [sys.executable, "-m", "gelato.benchmarks.demo", "--pair", "random", "--prompts", "4"]
    cmd += ["--max-new-tokens", "200", "--policies", "fixed-0"]
    demo = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        edge = device = 0
        deadline = time.monotonic() + 120
        while not (edge and device) and time.monotonic() < deadline and demo.poll() is None:
            for child in _children(demo.pid):
                line = _cmdline(child)
                edge = child if "gelato.edge.cli" in line else edge
                device = child if "gelato.device.cli" in line else device
            time.sleep(0.05)
        assert edge and device, "the demo did not start its edge and a device"
        os.kill(demo.pid, signal.SIGTERM)
        assert demo.wait(timeout=60) == 128 + signal.SIGTERM
        assert not _alive(edge) and not _alive(device)
    finally:
        demo.kill()
        for pid in _children(demo.pid):
            os.kill(pid, signal.SIGKILL)


def rec(ids: list[int], energy_j: float | None = 1.0) -> dict[str, Any]:
    return {"token_ids": ids, "energy_j": energy_j}


def test_mismatches_names_policy_and_prompt() -> None:
    runs = {"fixed-0": [rec([1, 2]), rec([3])], "fixed-4": [rec([1, 2]), rec([3, 9])]}
    assert mismatches(runs, "fixed-0") == ["fixed-4: prompt 1"]
    assert mismatches({"a": [rec([1])], "b": [rec([1])]}, "a") == []
    # ar-device is the drafter's own output: never compared, never the reference
    runs = {"ar-device": [rec([7])], "ar-edge": [rec([1])], "gelato": [rec([1])]}
    assert lossless_reference(list(runs)) == "ar-edge" and mismatches(runs, "ar-edge") == []
    assert lossless_reference(["ar-device"]) is None


def test_device_energy_unavailable_is_none_not_zero() -> None:
    assert device_j_per_token([rec([1], 2.0), rec([2], 4.0)], 3) == 2.0
    assert device_j_per_token([rec([1], 2.0), rec([2], None)], 3) is None
    assert device_j_per_token([rec([], 2.0)], 0) is None


def test_device_meters_its_own_process_by_default() -> None:
    """Edge and device share the demo's host: a host-wide meter (RAPL: whole CPU packages; NVML: the
    whole GPU) would count the edge's work as the device's, so the demo's default is cpu-model."""
    from gelato.benchmarks.demo import build_parser, device_args

    args = build_parser().parse_args([])
    assert args.meter == "cpu-model"
    flags = device_args("drafter", "127.0.0.1:1", Path("p.jsonl"), 8, "fixed-4", args.meter)
    assert flags[flags.index("--meter") + 1] == "cpu-model" and flags[flags.index("--policy") + 1] == "fixed-4"
    chosen = build_parser().parse_args(["--meter", "rapl"]).meter
    assert device_args("d", "h:1", Path("p"), 8, "gelato", chosen)[-2:] == ["--meter", "rapl"]
    helptext = " ".join(build_parser().format_help().split())
    assert "host-wide meters mislead here" in helptext and "include the edge's energy" in helptext


def test_energy_note_warns_when_a_host_wide_meter_read_the_edge_too() -> None:
    from gelato.benchmarks.demo import energy_lines

    est = energy_lines([{"energy": ["cpu-model (estimated)"]}, {"energy": ["cpu-model (estimated)"]}])
    assert est[0].startswith("device energy: cpu-model (estimated) meter")
    assert "device process alone" in est[1] and not any("WARNING" in line for line in est)
    for source in ("rapl", "nvml", "jetson"):
        lines = energy_lines([{"energy": [f"{source} (measured)"]}])
        assert any(line.startswith(f"WARNING: {source} reads the whole host") for line in lines), lines
        assert any("includes the edge's energy" in line for line in lines)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--prompts", "0"], "--prompts must be >= 1"),
        (["--policies", "ar-edge,gelatto"], "--policies: unknown policy 'gelatto'"),
        (["--policies", "ar-edge,"], "--policies: an empty name"),
        (["--policies", "fixed-4, fixed-4"], "--policies: a policy named twice"),  # its 2nd run went unchecked
        (["--meter", "watts"], "--meter: unknown meter 'watts'"),
        (["--json", "/nonexistent/rows.json"], "--json: no such folder: /nonexistent"),  # was a traceback at the end
    ],
)
def test_bad_arguments_fail_before_any_process_starts(
    extra: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo would otherwise fail inside a device process, after the edge started, as a traceback."""
    with pytest.raises(SystemExit) as info:
        main(extra)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_exit_on_signals_leaves_an_ignored_sighup_ignored() -> None:
    """Under `nohup` (SIGHUP ignored) a closed terminal must not end a demo or load run: an ignored
    signal stays ignored; SIGTERM is caught; both handlers are put back after."""
    import signal

    from gelato.benchmarks.procs import exit_on_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term_before = signal.getsignal(signal.SIGTERM)
    try:
        with exit_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (term_before, signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is term_before
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("fault", ["interrupt", "hang"])
def test_ctrl_c_or_a_hung_device_is_one_line_and_stops_the_edge(
    fault: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during a device run, or a device that outlives its timeout, ended the demo with a
    traceback: now one line (exit 130, or 1), and the edge is stopped either way."""
    from gelato.benchmarks import demo

    stopped: list[bool] = []

    class Edge:
        address = "127.0.0.1:1"

        def stop(self) -> None:
            stopped.append(True)

    def device(args: list[str]) -> list[dict[str, Any]]:
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise subprocess.TimeoutExpired(["gelato-device"], 900)

    monkeypatch.setattr(demo, "start_edge", lambda args: Edge())
    monkeypatch.setattr(demo, "run_device", device)
    assert main(["--prompts", "1"]) == (130 if fault == "interrupt" else 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert ("interrupted" if fault == "interrupt" else "took longer than 900 s") in err
    assert stopped == [True]
