"""`gelato-device --log-format json`: every line on stderr is a JSON record, a collector's input.
gRPC's C core writes lines of its own (one per failed TLS handshake, at its default verbosity),
which are not JSON: the device keeps it to errors before gRPC loads. The device's own warnings,
errors and per-prompt statistics are records too, shown whatever `--log-level` is, as text lines
are. Real edge and device processes, TLS made at test time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EdgeProcess, run_device
from tests.edge.certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    return {**make_pki(folder / "edge"), "other_ca.crt": make_pki(folder / "other", ca_name="another-ca")["ca.crt"]}


@pytest.fixture(scope="module")
def tls_edge(pair: dict[str, Path], pki: dict[str, Path]) -> Iterator[EdgeProcess]:
    edge = EdgeProcess(
        ["--target", str(pair["target"]), "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"])]
    )
    yield edge
    edge.stop()


def records(stderr: str) -> list[dict[str, object]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), stderr
    return [json.loads(line) for line in lines]


def device(pair: dict[str, Path], edge: EdgeProcess, ca: Path, *extra: str) -> tuple[int, list[dict[str, object]]]:
    address = edge.address.replace("127.0.0.1", "localhost")  # the name the certificate carries
    args = ["--drafter", str(pair["drafter_agree"]), "--edge", address, "--tls-ca", str(ca)]
    res = run_device([*args, "--prompt", "Ava has 3 apples.", "--max-new-tokens", "6", "--log-format", "json", *extra])
    return res.returncode, records(res.stderr)


def test_a_failed_tls_handshake_leaves_only_json_on_stderr(
    pair: dict[str, Path], pki: dict[str, Path], tls_edge: EdgeProcess
) -> None:
    code, recs = device(pair, tls_edge, pki["other_ca.crt"], "--connect-timeout-s", "2")
    assert code == 1
    assert [r["level"] for r in recs] == ["ERROR"] and "could not reach gelato-edge" in str(recs[0]["message"])


def test_warnings_and_statistics_are_records_at_any_level(
    pair: dict[str, Path], pki: dict[str, Path], tls_edge: EdgeProcess
) -> None:
    code, recs = device(pair, tls_edge, pki["ca.crt"], "--policy", "fixed-2", "--energy-budget-j-per-token", "1")
    assert code == 0
    said = [(r["level"], r["logger"], str(r["message"])) for r in recs]
    assert any(level == "WARNING" and "does not steer by --energy-budget" in m for level, _, m in said), said
    # The statistics line (without --json) is a record too, though INFO is below the default level.
    assert any(level == "INFO" and logger == "gelato.cli" and m.startswith("-- 6 tokens") for level, logger, m in said)
