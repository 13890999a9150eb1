"""Under `--log-format json` (flag or variable) what the argument parse itself says is JSON too:
a usage error (a bad value of a flag or a variable, which argparse printed as a 24-line usage
dump) is one ERROR record and exit 2, and the Kubernetes service-link warning a WARNING record,
so a collector reading a container's stderr gets JSON lines only. Text mode is unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GELATO_")}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**clean, **env})


@pytest.mark.parametrize(
    ("module", "args", "env", "says"),
    [
        ("gelato.edge.cli", [], {"GELATO_EDGE_LOG_FORMAT": "json", "GELATO_EDGE_PORT": "99999"}, "GELATO_EDGE_PORT"),
        ("gelato.edge.cli", ["--log-format", "json", "--port", "x"], {}, "argument --port"),
        ("gelato.device.cli", ["--log-format=JSON", "--max-new-tokens", "abc"], {}, "argument --max-new-tokens"),
    ],
)
def test_a_usage_error_is_one_json_record(module: str, args: list[str], env: dict[str, str], says: str) -> None:
    res = run(module, args, env)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    record = json.loads(lines[0])
    assert record["level"] == "ERROR" and "error: " in record["message"] and says in record["message"], record


def test_the_service_link_warning_is_a_json_record_and_text_stays_text() -> None:
    link = {"GELATO_EDGE_PORT": "tcp://10.96.0.7:50051", "GELATO_EDGE_LOG_FORMAT": "json"}
    res = run("gelato.edge.cli", ["--max-sessions", "0"], link)
    records = [json.loads(line) for line in res.stderr.splitlines()]
    assert res.returncode == 2 and [r["level"] for r in records] == ["WARNING", "ERROR"], res.stderr
    assert "a Kubernetes service link" in records[0]["message"]
    text = run("gelato.edge.cli", ["--port", "x"], {})
    assert text.returncode == 2 and text.stderr.startswith("usage: ") and "not a port number" in text.stderr, (
        text.stderr
    )


def test_json_is_asked_as_argparse_reads_the_flag() -> None:
    """Abbreviated (`--log-f`, which argparse takes), the last one winning, else the variable."""
    from gelato.cli_common import _asks_json

    assert _asks_json(["--log-f", "json"], None) and _asks_json(["--log-format=JSON"], None)
    assert not _asks_json(["--log-format", "json", "--log-format", "text"], None)
    assert _asks_json([], "json") and not _asks_json(["--log-format", "text"], "json")
    assert not _asks_json(["--log-level", "json"], None)
    res = run("gelato.device.cli", ["--log-f", "json", "--bogus"], {})
    assert res.returncode == 2 and json.loads(res.stderr)["level"] == "ERROR", res.stderr


def test_a_drafter_that_cannot_load_names_its_variable() -> None:
    res = run("gelato.device.cli", ["--prompt", "x"], {"GELATO_DEVICE_DRAFTER": "/nonexistent/x"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        "error: cannot load drafter '/nonexistent/x': no such local folder "
        "(--drafter came from GELATO_DEVICE_DRAFTER='/nonexistent/x')"
    ), res.stderr
