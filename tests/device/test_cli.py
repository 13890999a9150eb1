"""`gelato-device` (and `gelato-energy`) command lines: sampling runs, seeds, energy, precise CLI errors."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gelato.power import radio_profile
from gelato.tiny.random_pair import build_random_pair
from tests.conftest import EdgeProcess, run_device


def device_args(pair: dict[str, Path], edge: EdgeProcess, *extra: str) -> list[str]:
    return ["--drafter", str(pair["drafter_agree"]), "--edge", edge.address, *extra]


def test_sampling_runs_and_is_reproducible(pair: dict[str, Path], edge: EdgeProcess) -> None:
    args = device_args(pair, edge, "--prompt", "Ava has 3 apples.", "--prompt", "A box holds 4 shells.")
    args += ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--max-new-tokens", "30", "--json"]
    first = run_device([*args, "--seed", "5"])
    again = run_device([*args, "--seed", "5"])
    other = run_device([*args, "--seed", "6"])
    for res in (first, again, other):
        assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(recs) == 2 and all(r["n_tokens"] == 30 or r["token_ids"][-1] == 0 for r in recs)
    assert all(0 < r["accepted"] <= r["drafted"] for r in recs)
    assert first.stdout.split('"elapsed_s"')[0] == again.stdout.split('"elapsed_s"')[0]
    ids = lambda out: [json.loads(line)["token_ids"] for line in out.splitlines()]  # noqa: E731
    assert ids(first.stdout) == ids(again.stdout)
    assert ids(first.stdout) != ids(other.stdout)


def test_plain_output(pair: dict[str, Path], edge: EdgeProcess) -> None:
    res = run_device(device_args(pair, edge, "--prompt", "Ben reads 4 pages.", "--max-new-tokens", "8"))
    assert res.returncode == 0, res.stderr
    assert "8 tokens in" in res.stderr and "rounds" in res.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--policy", "bogus"], "unknown policy"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--dtype", "float32", "--device", "tpu"], "--device"),
        (["--edge", "127.0.0.1:99999"], "argument --edge: port must be in 0-65535"),
        (["--edge", "edgehost"], "argument --edge: expected HOST:PORT"),
        (["--edge", "::1:50051"], "[ADDR]:PORT"),
        # Malformed gRPC targets: gRPC core would take them, never connect and never let the
        # process exit; refused here, before any channel.
        (["--edge", "ipv4:127.0.0.1"], "needs :PORT"),
        (["--edge", "ipv4:abc:50051"], "not an IPv4 ADDR:PORT"),
        (["--edge", "dns:///localhost"], "needs :PORT"),
        (["--edge", "http://edge:50051"], "dns:///HOST:PORT"),
        (["--top-m", "0"], "--top-m must be >= 1"),
        (["--limit", "-1"], "--limit must be >= 0"),
        (["--connect-timeout-s", "0"], "--connect-timeout-s must be > 0"),
        (["--trace", "/nonexistent-dir/rounds.jsonl"], "--trace: no such folder: /nonexistent-dir"),
        (["--trace", "/tmp"], "--trace: /tmp is a folder"),
        (["--drafter", "./no-such-drafter"], "no such local folder"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
    ],
)
def test_device_bad_arguments(pair: dict[str, Path], edge: EdgeProcess, extra: list[str], needle: str) -> None:
    res = run_device(device_args(pair, edge, "--prompt", "x", *extra))
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_prompts_file_errors(pair: dict[str, Path], edge: EdgeProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    res = run_device(device_args(pair, edge, "--prompts-file", str(bad)))
    assert res.returncode == 2 and "bad.jsonl:2" in res.stderr
    res = run_device(device_args(pair, edge, "--prompts-file", str(tmp_path / "missing.jsonl")))
    assert res.returncode == 2 and "missing.jsonl" in res.stderr


def test_unreachable_edge(pair: dict[str, Path]) -> None:
    res_args = ["--connect-timeout-s", "2"]
    args = ["--drafter", str(pair["drafter_agree"]), "--edge", "127.0.0.1:1", "--prompt", "x", *res_args]
    res = run_device(args)
    assert res.returncode == 1 and "could not reach gelato-edge at 127.0.0.1:1 within 2 s" in res.stderr
    assert " INFO " not in res.stderr, res.stderr  # --log-level WARNING by default
    assert "does not steer" not in res.stderr  # no budget given
    # A budget given to a policy that does not decide by it: accepted, and said.
    for policy, warned in (("fixed-4", True), ("heuristic", True), ("gelato", False), ("lyapunov", False)):
        budgeted = run_device([*args, "--policy", policy, "--energy-budget-j-per-token", "0.01"])
        assert budgeted.returncode == 1, budgeted.stderr
        said = f"--policy {policy} does not steer by --energy-budget-j-per-token (only lyapunov and gelato do)"
        assert (said in budgeted.stderr) == warned, budgeted.stderr
    # --log-level INFO shows which meter `auto` took (or why none reads here: the estimate).
    verbose = run_device([*args, "--log-level", "info"])
    assert verbose.returncode == 1 and re.search(
        r"gelato\.power INFO (power meter: \w+ \(measured\)|no power meter reads here)", verbose.stderr
    ), verbose.stderr
    # With --json, a consumer of stdout gets the first prompt's error record too.
    res = run_device(
        ["--drafter", str(pair["drafter_agree"]), "--edge", "127.0.0.1:1", "--prompt", "y", "--json", *res_args]
    )
    assert res.returncode == 1
    (rec,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert rec["prompt"] == "y" and rec["stop_reason"] == "error" and rec["n_tokens"] == 0
    assert "could not reach gelato-edge at 127.0.0.1:1" in rec["error"]


def test_tokenizer_mismatch_via_cli(edge: EdgeProcess, tmp_path: Path) -> None:
    other = build_random_pair(tmp_path / "other", vocab_size=300, seed=4)
    res = run_device(["--drafter", str(other["drafter_agree"]), "--edge", edge.address, "--prompt", "x"])
    assert res.returncode == 1
    assert "tokenizer mismatch" in res.stderr and str(other["drafter_agree"]) in res.stderr


def test_energy_accounting_with_replay_meter_and_trace(
    pair: dict[str, Path], edge: EdgeProcess, tmp_path: Path
) -> None:
    """A constant 2 W replayed trace: each round's compute energy is 2 W x its wall time, radio
    energy follows the LTE model from its bytes, and the JSON totals add up."""
    power = tmp_path / "power.csv"
    power.write_text("t_s,power_w,kind\n0,2.0,measured\n1000,2.0,measured\n")  # a recording of a real meter
    trace = tmp_path / "rounds.jsonl"
    extra = ["--prompt", "Ava has 3 apples.", "--max-new-tokens", "20", "--json", "--policy", "fixed-3"]
    res = run_device(
        device_args(pair, edge, *extra, "--meter", f"replay:{power}", "--radio", "lte", "--trace", str(trace))
    )
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    rounds = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rounds) == rec["rounds"] > 0
    lte = radio_profile("lte")
    assert lte is not None
    for r in rounds:
        assert r["energy_source"] == "replay" and r["energy_kind"] == "measured"
        assert r["q_deficit_j"] is None  # no budget, no queue: null, as in the record (not 0 J)
        assert r["e_compute_j"] == pytest.approx(2.0 * r["t_round_s"], rel=1e-6, abs=1e-9)
        # Its bytes, and the radio's connected state between its transfers: the tail's power over
        # the round's time, less the transfers' own (the round is far shorter than LTE's tail).
        transfer_s = sum(lte.transfer_s(r["bytes_up"], r["bytes_down"]))
        link_j = lte.tail_mw / 1e3 * (r["t_round_s"] - transfer_s)
        assert r["e_radio_link_j"] == pytest.approx(link_j, rel=1e-3, abs=1e-6)
        assert r["e_radio_j"] == pytest.approx(lte.round_energy_j(r["bytes_up"], r["bytes_down"]) + link_j, rel=1e-3)
        assert r["e_j"] == pytest.approx(r["e_compute_j"] + r["e_radio_j"])
        assert r["t_round_s"] >= r["t_draft_s"] + r["t_edge_compute_s"]
        assert r["bytes_up"] > 14 and r["bytes_down"] > 14
    assert sum(r["emitted"] for r in rounds) == rec["n_tokens"]
    assert rec["bytes_up"] > sum(r["bytes_up"] for r in rounds)  # plus open and close
    assert rec["energy_j"] >= sum(r["e_j"] for r in rounds)
    # The meter's part on its own: beside LTE's 12.3 J tail (in radio_j) the compute energy is
    # ~0.1 J, which a 5 % tolerance on the sum could not see (dropping it entirely passed). It spans
    # what elapsed_s does, the close included (~0.4 ms; 2 ms on a busy machine once): 2 W x its
    # time, to elapsed_s's rounding (0.1 ms) and the few statements outside both.
    assert rec["energy_j"] - rec["radio_j"] == pytest.approx(2.0 * rec["elapsed_s"], abs=2.0 * 0.25e-3)
    # One whole tail at the generation's end, and the connected state over the generation (from
    # the open to the end: within its elapsed time).
    connected_j = rec["radio_j"] - lte.tail_energy_j() - lte.round_energy_j(rec["bytes_up"], rec["bytes_down"])
    assert sum(r["e_radio_link_j"] for r in rounds) <= connected_j <= lte.tail_mw / 1e3 * rec["elapsed_s"]
    assert rec["energy_j_per_token"] == pytest.approx(rec["energy_j"] / rec["n_tokens"])
    assert rec["energy_source"] == "replay" and rec["energy_kind"] == "measured"
    assert rec["radio_model"] == "lte"  # the radio's part is modelled, whatever the meter's label


def test_energy_unavailable_is_null_not_zero(pair: dict[str, Path], edge: EdgeProcess, tmp_path: Path) -> None:
    res = run_device(device_args(pair, edge, "--prompt", "x", "--max-new-tokens", "4", "--json", "--meter", "none"))
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["energy_j"] is None and rec["energy_j_per_token"] is None
    assert rec["energy_kind"] == "unavailable"
    res = run_device(device_args(pair, edge, "--prompt", "x", "--meter", f"replay:{tmp_path / 'nope.csv'}"))
    assert res.returncode == 2 and "cannot read power trace" in res.stderr
    res = run_device(device_args(pair, edge, "--prompt", "x", "--json", "--max-new-tokens", "4"))
    rec = json.loads(res.stdout)
    assert rec["energy_source"] in {"nvml", "rapl", "jetson", "cpu-model"}
    assert rec["energy_kind"] == ("estimated" if rec["energy_source"] == "cpu-model" else "measured")


def test_energy_probe_cli() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "gelato.power.cli", "probe", "--json", "--seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    rows = {r["source"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"nvml", "rapl", "jetson", "cpu-model"}
    cpu = rows["cpu-model"]
    assert cpu["available"] and cpu["kind"] == "estimated" and cpu["mean_w"] > 0
    assert cpu["device_profile"] == "phone"  # an estimate names the profile it assumes
    assert all(r["reason"] for r in rows.values() if not r["available"])


def test_energy_probe_of_a_meter_that_fails_to_read_is_valid_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A meter that opened but read nothing over the window (a RAPL or NVML read failing, a
    Jetson rail silent for over a second: NaN joules) is reported null with the reason, in JSON
    any parser takes (a bare NaN is not JSON), and in the text listing."""
    from gelato.power import MeterUnavailable, cli
    from gelato.power.base import Meter

    class Failing(Meter):
        source = "rapl"

        def joules_at(self, now: float) -> float:
            return math.nan

    real = cli.open_source

    def open_source(source: str, profile: str) -> Meter:
        if source == "rapl":
            return Failing()
        if source == "cpu-model":
            return real(source, profile)
        raise MeterUnavailable("not on this host")

    monkeypatch.setattr(cli, "open_source", open_source)
    assert cli.main(["probe", "--json", "--seconds", "0.05"]) == 0
    rows = {r["source"]: r for r in json.loads(capsys.readouterr().out, parse_constant=pytest.fail)}
    assert rows["rapl"]["available"] and rows["rapl"]["joules"] is None and rows["rapl"]["mean_w"] is None
    assert "failed to read" in rows["rapl"]["reason"] and rows["cpu-model"]["mean_w"] > 0
    assert cli.main(["probe", "--seconds", "0.05"]) == 0
    assert "rapl       measured  no reading over the window" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device-profile", "toaster"], "invalid choice: 'toaster'"),
        (["--seconds", "-1"], "must be > 0"),
        (["--seconds", "soon"], "not a number"),
    ],
)
def test_energy_probe_bad_arguments(extra: list[str], needle: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "gelato.power.cli", "probe", *extra], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr


def run_device_env(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`run_device` with GELATO_DEVICE_* variables added to the environment (none inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GELATO_DEVICE_")}
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**base, **env})


def test_environment_sets_flags_and_command_line_wins(pair: dict[str, Path], edge: EdgeProcess) -> None:
    """The same run configured by GELATO_DEVICE_* variables gives the same tokens as by flags; a flag
    on the command line overrides its variable (and a --prompt overrides GELATO_DEVICE_PROMPTS_FILE)."""
    flags = device_args(pair, edge, "--prompt", "Ava has 3 apples.", "--max-new-tokens", "12", "--json")
    by_flags = run_device(flags)
    env = {
        "GELATO_DEVICE_DRAFTER": str(pair["drafter_agree"]),
        "GELATO_DEVICE_EDGE": edge.address,
        "GELATO_DEVICE_PROMPT": "Ava has 3 apples.",
        "GELATO_DEVICE_MAX_NEW_TOKENS": "12",
        "GELATO_DEVICE_JSON": "true",
    }
    by_env = run_device_env([], env)
    assert by_flags.returncode == 0 and by_env.returncode == 0, by_env.stderr
    ids = lambda out: [json.loads(line)["token_ids"] for line in out.splitlines()]  # noqa: E731
    assert ids(by_env.stdout) == ids(by_flags.stdout) and len(ids(by_env.stdout)[0]) == 12
    env |= {"GELATO_DEVICE_MAX_NEW_TOKENS": "3", "GELATO_DEVICE_PROMPTS_FILE": "/nonexistent.jsonl"}
    del env["GELATO_DEVICE_PROMPT"]
    overridden = run_device_env(["--max-new-tokens", "12", "--prompt", "Ava has 3 apples."], env)
    assert overridden.returncode == 0, overridden.stderr
    assert ids(overridden.stdout) == ids(by_flags.stdout)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"GELATO_DEVICE_EDGE": "edgehost"}, "environment variable GELATO_DEVICE_EDGE='edgehost': expected HOST:PORT"),
        ({"GELATO_DEVICE_MAX_NEW_TOKENS": "1.5"}, "GELATO_DEVICE_MAX_NEW_TOKENS='1.5': invalid int value"),
        ({"GELATO_DEVICE_JSON": "sure"}, "GELATO_DEVICE_JSON='sure': expected 1/0, true/false, yes/no or on/off"),
        ({"GELATO_DEVICE_RADIO": "6g"}, "GELATO_DEVICE_RADIO='6g': invalid choice: '6g'"),
        (
            {"GELATO_DEVICE_PROMPT": "x", "GELATO_DEVICE_PROMPTS_FILE": "p.jsonl"},
            "environment variables GELATO_DEVICE_PROMPT and GELATO_DEVICE_PROMPTS_FILE are mutually exclusive",
        ),
        # A value out of bounds names the variable it came from, not only its flag.
        (
            {"GELATO_DEVICE_MAX_NEW_TOKENS": "0"},
            "--max-new-tokens must be >= 1, got 0 (--max-new-tokens came from GELATO_DEVICE_MAX_NEW_TOKENS='0')",
        ),
    ],
)
def test_device_bad_environment(env: dict[str, str], needle: str) -> None:
    res = run_device_env([] if "PROMPT" in " ".join(env) else ["--prompt", "x"], env)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_environment_limit_goes_with_its_prompts_file() -> None:
    """A deployment's GELATO_DEVICE_LIMIT with a --prompt typed on the command line (which
    silences GELATO_DEVICE_PROMPTS_FILE) is dropped, not refused: the run gets as far as the edge."""
    env = {"GELATO_DEVICE_PROMPTS_FILE": "/nonexistent.jsonl", "GELATO_DEVICE_LIMIT": "3"}
    res = run_device_env(["--prompt", "x", "--edge", "127.0.0.1:1", "--connect-timeout-s", "1"], env)
    assert res.returncode == 1 and "could not reach gelato-edge" in res.stderr, res.stderr
    # Without a prompts file to replace, a variable's limit is refused like a typed one, named.
    res = run_device_env([], {"GELATO_DEVICE_PROMPT": "x", "GELATO_DEVICE_LIMIT": "3"})
    assert res.returncode == 2, res.stderr
    assert "--limit counts the prompts of --prompts-file (--limit came from GELATO_DEVICE_LIMIT='3')" in res.stderr


def test_device_help_names_every_variable() -> None:
    from gelato.device.cli import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())
    names = parser.env_names()  # type: ignore[attr-defined]
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert set(names) == flags and names["--edge"] == "GELATO_DEVICE_EDGE"
    assert names["--energy-budget-j-per-token"] == "GELATO_DEVICE_ENERGY_BUDGET_J_PER_TOKEN"
    for name in names.values():
        assert f"[env: {name}]" in text, name


def test_help_and_settings_errors_load_neither_torch_nor_transformers() -> None:
    """`--help` and a settings error answer in a fraction of a second: the run's modules (torch,
    transformers) are imported only once the settings are valid."""
    code = (
        "import sys\n"
        "from gelato.device.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert main(['--prompt', 'x', '--max-new-tokens', '0']) == 2\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]" and "--max-new-tokens must be >= 1" in res.stderr


def test_any_failed_drafter_load_is_one_line(
    pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failure the loader does not foresee is one line naming its type and exit 2, as a
    ModelLoadError is (it was a traceback). In process, the loader patched to fail."""
    import gelato.models
    from gelato.device import cli

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("expected a Tensor, got NoneType\nsecond line")

    monkeypatch.setattr(gelato.models, "load_model", broken)
    args = ["--drafter", str(pair["drafter_agree"]), "--prompt", "x", "--meter", "none", "--threads", "1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    name = repr(str(pair["drafter_agree"]))
    assert err == f"error: cannot load drafter {name}: RuntimeError: expected a Tensor, got NoneType\n", err


def test_a_run_that_fails_before_generating_closes_its_meter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The meter opens before the drafter loads (a bad --meter costs no load); a drafter that does
    not load then must close it (NVML's init, a sampler thread), as a finished run does."""
    from gelato.device import cli

    closed: list[bool] = []
    real = cli.open_accountant

    def tracked(config: Any) -> Any:
        acct = real(config)
        close = acct.meter.close
        acct.meter.close = lambda: (closed.append(True), close())[1]
        return acct

    monkeypatch.setattr(cli, "open_accountant", tracked)
    args = ["--drafter", str(tmp_path / "no-such-drafter"), "--prompt", "x", "--meter", "cpu-model", "--threads", "1"]
    assert cli.main(args) == 2 and "cannot load drafter" in capsys.readouterr().err
    assert closed == [True]


def _local_run(pair: dict[str, Path], prompts: int) -> subprocess.Popen[str]:
    """`gelato-device --policy ar-device` (no edge needed) over `prompts` prompts, JSON lines out."""
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", "--drafter", str(pair["drafter_agree"])]
    cmd += ["--policy", "ar-device", "--meter", "none", "--radio", "none", "--max-new-tokens", "64", "--json"]
    for i in range(prompts):
        cmd += ["--prompt", f"Tom has {i} apples."]
    base = {k: v for k, v in os.environ.items() if not k.startswith("GELATO_DEVICE_")}
    # SIGINT as a terminal gives it: a suite started in the background (`(./gelato.sh test &)`)
    # runs with SIGINT ignored, which its children inherit, and the Ctrl-C test's run then went on.
    reset = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base, preexec_fn=reset)


def test_a_reader_that_goes_away_ends_the_run_quietly(pair: dict[str, Path]) -> None:
    """`gelato-device --json | head -1`: once its reader is gone the device stops, exit 141 (a
    shell's SIGPIPE), with no traceback."""
    proc = _local_run(pair, 200)  # more output than a pipe holds: the device is still writing
    assert proc.stdout is not None and proc.stdout.readline().startswith("{")
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and "Traceback" not in err, err


@pytest.mark.parametrize(("sig", "code", "line"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_ends_the_run_in_one_line(pair: dict[str, Path], sig: str, code: int, line: str) -> None:
    """SIGINT mid-run: exit 130 and one line, not a KeyboardInterrupt traceback. SIGTERM (`docker
    stop`) the same way, exit 143: as a container's PID 1 its default action is none (the stop
    would wait out its timeout and SIGKILL the run); here, not PID 1, it killed the run at once."""

    proc = _local_run(pair, 400)
    assert proc.stdout is not None and proc.stdout.readline().startswith("{")
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"gelato-device: {line}", err


@pytest.mark.parametrize(
    ("edge_address", "policy", "warned"),
    [("127.0.0.1:50051", "gelato", True), ("10.0.0.7:50051", "gelato", False), ("127.0.0.1:50051", "ar-device", False)],
)
def test_a_host_wide_meter_beside_a_loopback_edge_is_said(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], edge_address: str, policy: str, warned: bool
) -> None:
    """RAPL (whole CPU packages), Jetson (the board) and NVML (the GPU) read the whole host: with the
    edge on the same host (a loopback --edge) its energy is in every device reading; said, not silent
    (not for ar-device, which never reaches the edge)."""
    from gelato.device import cli
    from gelato.device.config import DeviceConfig
    from gelato.power import CpuModelMeter

    class HostWide(CpuModelMeter):
        source = "rapl"

    monkeypatch.setattr(cli, "open_meter", lambda *a: HostWide("phone"))
    args = ["--edge", edge_address, "--prompt", "x", "--policy", policy]
    config = DeviceConfig.from_args(cli.build_parser().parse_args(args))
    cli.open_accountant(config).meter.close()
    err = capsys.readouterr().err
    assert ("warning: the rapl meter reads whole CPU packages, which the edge at" in err) == warned, err


def test_a_policy_asking_for_more_drafts_than_the_edge_verifies_is_told_so(
    pair: dict[str, Path], edge: EdgeProcess, tmp_path: Path
) -> None:
    """`fixed-40` against an edge verifying at most 32 drafts a round: the rounds draft 32, and the
    user is told once (the record still says fixed-40; the trace's k_max was the only sign)."""
    trace = tmp_path / "rounds.jsonl"
    args = ["--prompt", "Ava has 3 apples.", "--prompt", "Ben reads.", "--max-new-tokens", "40", "--json"]
    res = run_device(device_args(pair, edge, *args, "--policy", "fixed-40", "--trace", str(trace)))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("--policy fixed-40 asks for up to 40 drafts a round; the edge verifies at most 32") == 1
    rounds = [json.loads(line) for line in trace.read_text().splitlines()]
    assert max(r["k"] for r in rounds) == 32
    for fits in (["--policy", "fixed-32"], ["--policy", "fixed-40", "--k-max", "16"]):  # --k-max caps it too
        ok = run_device(device_args(pair, edge, "--prompt", "x", "--max-new-tokens", "4", *fits))
        assert ok.returncode == 0 and "drafts a round" not in ok.stderr, (fits, ok.stderr)
