"""`docker/make-secrets.sh`: the edge certificate names what was asked for, and a folder that
already holds one for other names is refused, not silently kept (devices would then fail the TLS
name check against a certificate the script said was right)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "make-secrets.sh"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def make(out: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(out), *names], capture_output=True, text=True, timeout=120)


def test_names_are_read_back_and_other_names_refused(tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    first = make(out, "edge", "127.0.0.1")
    assert first.returncode == 0, first.stderr
    assert "edge.crt names: DNS:edge, IP Address:127.0.0.1" in first.stdout
    assert {p.name for p in out.iterdir()} >= {"ca.crt", "edge.crt", "edge.key", "device.crt", "device.key", "token"}
    crt = (out / "edge.crt").read_bytes()
    again = make(out, "edge")  # names the certificate carries: kept as is
    assert again.returncode == 0 and (out / "edge.crt").read_bytes() == crt
    other = make(out, "edge.example.org")
    assert other.returncode == 1 and "does not name edge.example.org" in other.stderr
    assert (out / "edge.crt").read_bytes() == crt  # nothing replaced
