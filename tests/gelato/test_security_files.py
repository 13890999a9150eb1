"""Secret files other users may read or write are used, with a warning naming the file and its
mode: a token file (both CLIs), the edge's TLS key and the device's client key. A file only its
owner can use, or one refused for its content, gets no such warning."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gelato.security import SecurityConfigError, channel_credentials, read_token, server_credentials
from tests.edge.certs import make_pki

OPEN = "is open to other users"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "gelato.security"]


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_token_others_may_use_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = tmp_path / "token"
    path.write_text("abc\n")
    path.chmod(mode)
    with caplog.at_level(logging.WARNING):
        assert read_token(path) == "abc"
    assert warnings(caplog) == [f"token file {path} {OPEN} (mode {mode:04o}): chmod 600 {path}"]


def test_a_private_token_or_a_refused_one_gets_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    private, bad = tmp_path / "private", tmp_path / "bad"
    private.write_text("abc\n")
    private.chmod(0o600)
    bad.write_text("two words\n")
    bad.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert read_token(private) == "abc"
        with pytest.raises(SecurityConfigError, match="one word"):
            read_token(bad)  # refused: its error alone, not a warning about a file never used
    assert warnings(caplog) == []


def test_tls_keys_others_may_read_are_used_with_a_warning(
    pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        server_credentials(pki["server.crt"], pki["server.key"], pki["ca.crt"])
        channel_credentials(pki["ca.crt"], pki["client.crt"], pki["client.key"])
    assert warnings(caplog) == []  # make_pki leaves keys 0600, as openssl does
    pki["server.key"].chmod(0o644)
    pki["client.key"].chmod(0o660)
    with caplog.at_level(logging.WARNING):
        server_credentials(pki["server.crt"], pki["server.key"])
        channel_credentials(pki["ca.crt"], pki["client.crt"], pki["client.key"])
        channel_credentials(pki["ca.crt"])  # no client key: nothing to warn about
    assert warnings(caplog) == [
        f"TLS key {pki['server.key']} {OPEN} (mode 0644): chmod 600 {pki['server.key']}",
        f"TLS key {pki['client.key']} {OPEN} (mode 0660): chmod 600 {pki['client.key']}",
    ]


def test_the_device_cli_shows_the_warning(tmp_path: Path) -> None:
    """The warning reaches a user's terminal at the default log level (the run itself then fails:
    nothing listens on port 1)."""
    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o644)
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", "--edge", "127.0.0.1:1"]
    cmd += ["--prompt", "x", "--auth-token-file", str(token), "--connect-timeout-s", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "could not reach gelato-edge" in res.stderr, res.stderr
    assert f"token file {token} {OPEN} (mode 0644): chmod 600 {token}" in res.stderr, res.stderr


def test_a_key_read_twice_is_warned_about_once(pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """The edge checks its credentials at start and builds them again to bind: one warning."""
    pki["server.key"].chmod(0o640)
    with caplog.at_level(logging.WARNING):
        server_credentials(pki["server.crt"], pki["server.key"])
        server_credentials(pki["server.crt"], pki["server.key"])
    assert len(warnings(caplog)) == 1, warnings(caplog)
