"""`gelato-device` and `gelato-edge` command lines: sampling runs, seeds, precise CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    ],
)
def test_device_bad_arguments(pair: dict[str, Path], edge: EdgeProcess, extra: list[str], needle: str) -> None:
    res = run_device(device_args(pair, edge, "--prompt", "x", *extra))
    assert res.returncode == 2
    assert needle in res.stderr


def test_prompts_file_errors(pair: dict[str, Path], edge: EdgeProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    res = run_device(device_args(pair, edge, "--prompts-file", str(bad)))
    assert res.returncode == 2 and "bad.jsonl:2" in res.stderr
    res = run_device(device_args(pair, edge, "--prompts-file", str(tmp_path / "missing.jsonl")))
    assert res.returncode == 2 and "missing.jsonl" in res.stderr


def test_unreachable_edge(pair: dict[str, Path]) -> None:
    res_args = ["--connect-timeout-s", "2"]
    res = run_device(["--drafter", str(pair["drafter_agree"]), "--edge", "127.0.0.1:1", "--prompt", "x", *res_args])
    assert res.returncode == 1 and "cannot reach gelato-edge at 127.0.0.1:1" in res.stderr


def test_tokenizer_mismatch_via_cli(edge: EdgeProcess, tmp_path: Path) -> None:
    other = build_random_pair(tmp_path / "other", vocab_size=300, seed=4)
    res = run_device(["--drafter", str(other["drafter_agree"]), "--edge", edge.address, "--prompt", "x"])
    assert res.returncode == 1
    assert "tokenizer mismatch" in res.stderr and str(other["drafter_agree"]) in res.stderr


def test_edge_bad_target(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "edge.cli", "--port", "0", "--target", str(tmp_path / "nope")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "cannot load target" in res.stderr
