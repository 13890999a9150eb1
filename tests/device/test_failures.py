"""The device side of failures: an edge stopped mid-generation, an unreachable
edge, and one bad prompt in a file — precise one-line errors, partial output kept, no traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gelato.models import ModelLoadError, load_model
from tests.conftest import EdgeProcess, run_device


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_unreachable_edge_is_reported_quickly(pair: dict[str, Path]) -> None:
    t0 = time.monotonic()
    res = run_device(["--drafter", str(pair["drafter_agree"]), "--edge", "127.0.0.1:1", "--prompt", "hi"])
    assert res.returncode == 1
    assert "could not reach gelato-edge at 127.0.0.1:1 within 10 s" in res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60  # model loading + the 10 s default, not the old 60 s silence


def test_bad_prompt_in_a_file_does_not_stop_the_others(
    pair: dict[str, Path], edge: EdgeProcess, tmp_path: Path
) -> None:
    lines = ["Ava has 3 apples.", "x " * 900, "   ", "Ben reads 4 pages."]  # too long for 512, empty
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    args = ["--drafter", str(pair["drafter_agree"]), "--edge", edge.address, "--prompts-file", str(path)]
    res = run_device([*args, "--max-new-tokens", "8", "--json"])
    assert res.returncode == 1 and "2 of 4 prompts run failed" in res.stderr and "not run" not in res.stderr
    recs = records(res.stdout)
    assert [r["stop_reason"] for r in recs] == ["max_new_tokens", "error", "error", "max_new_tokens"]
    assert "INVALID_ARGUMENT" in recs[1]["error"] and "context limit" in recs[1]["error"]
    assert recs[2]["error"] == "empty prompt"  # refused locally, the edge never saw it
    fast = run_device([*args, "--max-new-tokens", "8", "--json", "--fail-fast"])
    assert fast.returncode == 1 and len(records(fast.stdout)) == 2
    assert "1 of 2 prompts run failed (their lines say why); --fail-fast stopped there, 2 not run" in fast.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_edge_stopped_mid_generation(pair: dict[str, Path], tmp_path: Path, sig: signal.Signals) -> None:
    """SIGKILL breaks the session: the tokens so far are printed with the reason. SIGTERM drains:
    the open session may finish within the edge's grace period. Either way the next prompt is
    reported unreachable within the connect timeout, never a hang or a traceback. (No waiting for
    the edge to come back, `--edge-wait-s 0`: that is `test_failover`'s.)"""
    edge = EdgeProcess(["--target", str(pair["target"])])
    trace = tmp_path / "trace.jsonl"
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", "--drafter", str(pair["drafter_agree"])]
    cmd += ["--edge", edge.address, "--json", "--trace", str(trace), "--policy", "fixed-1", "--no-chat-template"]
    cmd += ["--max-new-tokens", "400", "--prompt", "Ava has 3 apples.", "--prompt", "Ben reads 4 pages."]
    cmd += ["--edge-wait-s", "0"]
    dev = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not trace.exists() or len(trace.read_text().splitlines()) < 5):
            time.sleep(0.02)
        edge.proc.send_signal(sig)
        rounds_at_signal = len(trace.read_text().splitlines())
        out, err = dev.communicate(timeout=60)
    finally:
        dev.kill()
        edge.stop()
    rounds = len(trace.read_text().splitlines())
    assert "Traceback" not in err, err
    assert dev.returncode == 1
    first, second = records(out)
    assert first["n_tokens"] >= 5 and len(first["token_ids"]) == first["n_tokens"]
    if sig == signal.SIGKILL:
        assert first["stop_reason"] == "error" and "UNAVAILABLE" in first["error"], first
        assert rounds <= rounds_at_signal + 1, (rounds_at_signal, rounds)  # at most the one in flight
    else:
        assert first["stop_reason"] in ("error", "max_new_tokens", "eos"), first
        if first["stop_reason"] == "error":  # cut when the grace ran out: the edge said why
            assert "UNAVAILABLE" in first["error"], first
        assert rounds > rounds_at_signal + 2, (rounds_at_signal, rounds)  # served on: it drained
    assert second["stop_reason"] == "error" and "could not reach gelato-edge" in second["error"]


PROMPTS = ("Ava has 3 apples.", "Ben reads 4 pages.", "A box holds 4 shells.")


@pytest.mark.parametrize(
    ("flags", "frozen_s", "needle"),
    [
        (["--verdict-timeout-s", "2"], 5, "no answer from the edge within 2 s"),
        # The device's own deadline, named as its setting (it read "edge answered DEADLINE_EXCEEDED").
        (["--session-deadline-s", "8"], 10, "the session ran past --session-deadline-s (8 s) before it ended"),
    ],
)
def test_a_hung_edge_ends_the_generation_within_the_set_timeouts(
    pair: dict[str, Path], tmp_path: Path, flags: list[str], frozen_s: float, needle: str
) -> None:
    """The edge frozen mid-generation (SIGSTOP: alive, its port open, answering nothing) for longer
    than `--verdict-timeout-s` (or than what is left of `--session-deadline-s`): the generation
    ends DEADLINE_EXCEEDED, keeping its tokens (with the defaults, 120 s and an hour, it would
    simply go on once the edge is thawed); the thawed edge serves the last prompt."""
    edge = EdgeProcess(["--target", str(pair["target"])])
    trace = tmp_path / "trace.jsonl"
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", "--drafter", str(pair["drafter_agree"])]
    cmd += ["--edge", edge.address, "--json", "--trace", str(trace), "--policy", "fixed-1", "--no-chat-template"]
    cmd += ["--max-new-tokens", "200", *(a for p in PROMPTS for a in ("--prompt", p)), *flags]
    dev = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not trace.exists() or len(trace.read_text().splitlines()) < 5):
            time.sleep(0.02)
        edge.proc.send_signal(signal.SIGSTOP)
        time.sleep(frozen_s)
        edge.proc.send_signal(signal.SIGCONT)
        out, err = dev.communicate(timeout=120)
    finally:
        edge.proc.send_signal(signal.SIGCONT)
        dev.kill()
        edge.stop()
    assert "Traceback" not in err, err
    first, *_, last = records(out)
    assert first["stop_reason"] == "error" and needle in first["error"], first
    assert first["n_tokens"] >= 5 and len(first["token_ids"]) == first["n_tokens"]
    # The second prompt may meet the frozen edge too; the last comes after the thaw.
    assert last["stop_reason"] in ("max_new_tokens", "eos") and last["n_tokens"] > 0, last


def test_model_loading_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"not a checkpoint folder, missing config.json, model weights"):
        load_model(str(tmp_path), "drafter", "float32", "cpu")
    # A hub id that is not cached, with the hub unreachable: at once, not minutes of retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline mode would not even try the hub
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="not in the local cache and the hub cannot be reached"):
        load_model("example-org/no-such-model", "drafter", "float32", "cpu")
    assert time.monotonic() - t0 < 10


def test_a_mistyped_relative_path_is_named_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path that does not exist is not sent to the hub as an id: with more than one `/`
    it is "no such local folder" (it was the hub client's repository-id syntax error); with one,
    whose first part is a local folder, the hub's answer says no such local folder exists either.
    A folder with vocab.json but no merges.txt is no tokenizer (it failed inside the loader)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"cannot load target 'checkpoints/qwen/target': no such local folder"):
        load_model("checkpoints/qwen/target", "target", "float32", "cpu")
    (tmp_path / "ckpts").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match=r"hub cannot be reached \(no local folder 'ckpts/targt' either\)"):
        load_model("ckpts/targt", "target", "float32", "cpu")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    (half / "model.safetensors").write_bytes(b"")
    (half / "vocab.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="missing a tokenizer"):
        load_model(str(half), "target", "float32", "cpu")
