"""Token and TLS files on both sides: a token file is one RFC 6750 word (a byte order mark dropped),
and every bad token or TLS file (missing, unreadable, garbage, a key that is not the certificate's, an
encrypted key, a certificate without its key) is a one-line error (exit 2) naming the file, checked at
start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gelato.security import SecurityConfigError, read_token, server_credentials
from tests.conftest import EdgeProcess
from tests.edge.test_security import device, device_cli, one_line_error
from tests.edge.test_security import pki as pki
from tests.edge.test_security import secure_edge as secure_edge

# --- token files: one RFC 6750 word, a byte order mark dropped, anything else a one-line error ---


def test_read_token(tmp_path: Path) -> None:
    def token(data: bytes) -> str:
        path = tmp_path / "token"
        path.write_bytes(data)
        return read_token(path)

    assert token(b"abc\n") == "abc"
    assert token(b"\xef\xbb\xbfabc\r\n") == "abc"  # UTF-8 byte order mark dropped
    assert token(b"aZ09-._~+/==\n") == "aZ09-._~+/=="  # every token68 character, trailing '='
    cases = [
        (b"\xff\xfeabc", "not UTF-8 text (byte 0xff at offset 0)"),
        (b"\xef\xbb\xbf\n", "is empty"),
        (b"two words", "must be one word"),
        ("s3cr\u00e9t".encode(), "character '\u00e9' at position 5 is not allowed in a bearer token"),
        (b"abc\x7fdef", "character '\\x7f' at position 4"),
        (b"user:pass", "character ':' at position 5"),
        (b"ab=cd", "'=' anywhere but at the end"),
    ]
    for data, needle in cases:
        with pytest.raises(SecurityConfigError) as info:
            token(data)
        assert str(info.value).startswith(f"token file {tmp_path / 'token'}") and needle in str(info.value)


def test_bad_token_files_are_one_line_errors(pair: dict[str, Path], pki: dict[str, Path], tmp_path: Path) -> None:
    accented = tmp_path / "accented"
    accented.write_text("s3cr\u00e9t-token\n", encoding="utf-8")
    for path, needle in ((pki["binary_token"], "not UTF-8 text"), (accented, "is not allowed in a bearer token")):
        edge = subprocess.run(
            [sys.executable, "-m", "gelato.edge.cli", "--port", "0", "--auth-token-file", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        one_line_error(edge, f"token file {path}: ")
        assert needle in edge.stderr
        dev = device_cli(["--edge", "127.0.0.1:1", "--prompt", "x", "--auth-token-file", str(path)])
        one_line_error(dev, f"token file {path}: ")
        assert needle in dev.stderr


def test_a_token_file_with_a_byte_order_mark_works(
    pair: dict[str, Path], pki: dict[str, Path], secure_edge: EdgeProcess
) -> None:
    """The edge reads the plain file, the device one saved with a BOM and CRLF: the same token."""
    res = device(pair, secure_edge, "--tls-ca", str(pki["ca.crt"]), "--auth-token-file", str(pki["bom_token"]))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


# --- TLS files: checked at start, each error naming its file --------------------------------------


@pytest.fixture(scope="module")
def encrypted_key(pki: dict[str, Path]) -> Path:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki["server.key"].read_bytes(), password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    path = pki["server.key"].with_name("encrypted.key")
    path.write_bytes(pem)
    return path


EDGE_TLS_CASES = [
    (["server.crt", "other_server.key"], "TLS key {1} does not belong to the certificate {0}"),
    (["garbage.pem", "server.key"], "TLS certificate {0}: no PEM certificate in it"),
    (["server.key", "server.key"], "TLS certificate {0}: no PEM certificate in it"),  # the key given twice
    (["server.crt", "garbage.pem"], "TLS key {1}: not a PEM private key"),
    (["server.crt", "server.crt"], "TLS key {1}: not a PEM private key"),  # the certificate given twice
    (["server.crt", "encrypted.key"], "TLS key {1} is encrypted"),
    (["server.crt", "server.key", "garbage.pem"], "client CA {2}: no PEM certificate in it"),
]


@pytest.mark.parametrize(("files", "needle"), EDGE_TLS_CASES)
def test_edge_bad_tls_files(pki: dict[str, Path], encrypted_key: Path, files: list[str], needle: str) -> None:
    """Not "cannot listen on HOST:PORT: cannot bind" after the bind failed: a one-line error
    naming the file, before any model load."""
    paths = [str(encrypted_key if f == "encrypted.key" else pki[f]) for f in files]
    flags = ["--tls-cert", paths[0], "--tls-key", paths[1]] + (["--tls-client-ca", paths[2]] if len(paths) > 2 else [])
    res = subprocess.run(
        [sys.executable, "-m", "gelato.edge.cli", "--port", "0", *flags], capture_output=True, text=True, timeout=60
    )
    one_line_error(res, needle.format(*paths))
    assert "cannot bind" not in res.stderr
    with pytest.raises(SecurityConfigError, match=r"^(TLS|client CA) "):  # the library function checks the same
        server_credentials(*paths)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tls-ca", "garbage.pem"], "CA certificate {garbage.pem}: no PEM certificate in it"),
        (
            ["--tls-ca", "ca.crt", "--tls-cert", "client.crt", "--tls-key", "other_client.key"],
            "TLS key {other_client.key} does not belong to the certificate {client.crt}",
        ),
        (["--tls-cert", "client.crt", "--tls-key", "garbage.pem"], "TLS key {garbage.pem}: not a PEM private key"),
    ],
)
def test_device_bad_tls_files(pki: dict[str, Path], flags: list[str], needle: str) -> None:
    names = {name: str(path) for name, path in pki.items()}
    res = device_cli(["--edge", "127.0.0.1:1", "--prompt", "x", *[names.get(f, f) for f in flags]])
    for name, path in names.items():
        needle = needle.replace(f"{{{name}}}", path)
    one_line_error(res, needle)


def test_device_client_certificate_and_key_go_together_naming_the_variable(pki: dict[str, Path]) -> None:
    """One without the other is a usage error naming both flags, and the variable that set one."""
    res = device_cli(["--edge", "127.0.0.1:1", "--prompt", "x"], env={"GELATO_DEVICE_TLS_KEY": str(pki["client.key"])})
    one_line_error(res, "--tls-cert and --tls-key go together")
    assert "GELATO_DEVICE_TLS_KEY" in res.stderr, res.stderr
