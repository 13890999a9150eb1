"""`docker/make-secrets.sh`: the edge certificate names what was asked for, and a folder that
already holds one for other names is refused, not silently kept (devices would then fail the TLS
name check against a certificate the script said was right)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
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


def _expired_cert(path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gelato-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def test_an_expired_certificate_is_an_error_not_kept(tmp_path: Path) -> None:
    """Re-running the script over a folder whose certificate has expired (every handshake fails,
    while the edge reports healthy) said "secrets in ..." and kept it; now it says which expired."""
    out = tmp_path / "secrets"
    out.mkdir()
    _expired_cert(out / "ca.crt")
    res = make(out)
    assert res.returncode == 1 and "ca.crt has expired" in res.stderr, res.stderr


def test_private_files_are_readable_by_their_owner_alone(tmp_path: Path) -> None:
    """Keys and token: 0600, owned by the containers' uid 10001 as root, else by the user (group
    read once handed them to everyone sharing the user's primary group, as root to a host group
    10001, and the token was created world-readable)."""
    import os
    import stat

    out = tmp_path / "secrets"
    if os.geteuid() == 0 and shutil.which("setpriv"):  # as root: also run it as an ordinary user
        mine = Path(tempfile.mkdtemp())  # pytest's own folders are root's alone
        try:
            os.chmod(mine, 0o755)
            os.chown(mine, 65534, 65534)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(SCRIPT)]
            res = subprocess.run([*cmd, str(mine / "s")], capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            # The way to hand them over that works where the containers' uid is a subordinate one.
            assert f"podman unshare chown 10001 {mine / 's'}/edge.key" in res.stderr, res.stderr
            for name in ("edge.key", "device.key", "token", "ca.key"):
                assert stat.S_IMODE((mine / "s" / name).stat().st_mode) == 0o600, name
            # Handed over as told, then run again (e.g. to reissue edge.crt): not a chmod failure.
            for name in ("edge.key", "device.key", "token"):
                os.chown(mine / "s" / name, 10001, 10001)
            again = subprocess.run([*cmd, str(mine / "s")], capture_output=True, text=True, timeout=120)
            assert again.returncode == 0 and "Operation not permitted" not in again.stderr, again.stderr
        finally:
            shutil.rmtree(mine)
    res = make(out)
    assert res.returncode == 0, res.stderr
    for name in ("edge.key", "device.key", "token", "ca.key"):
        st = (out / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, name
        if name == "ca.key":
            assert st.st_uid == os.geteuid(), name  # the signing key stays with whoever signs
            continue
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (10001, 10001), name


def test_a_missing_ca_key_never_replaces_the_ca(tmp_path: Path) -> None:
    """`ca.key` moved off the box (as the script advises) and the script run again: with nothing to
    sign it keeps every file; with a certificate to issue it stops naming ca.key. It made a new CA,
    overwrote ca.crt, kept the old CA's edge.crt and said "secrets in ...": every handshake failed
    and the ca.crt the devices held was gone."""
    out = tmp_path / "secrets"
    assert make(out).returncode == 0
    ca = (out / "ca.crt").read_bytes()
    (out / "ca.key").rename(tmp_path / "ca.key")
    kept = make(out)
    assert kept.returncode == 0, kept.stderr
    assert (out / "ca.crt").read_bytes() == ca and not (out / "ca.key").exists()
    (out / "device.crt").unlink()
    res = make(out)
    assert res.returncode == 1 and "ca.crt is here without its key ca.key, which signs device.crt" in res.stderr
    assert (out / "ca.crt").read_bytes() == ca
    (tmp_path / "ca.key").rename(out / "ca.key")  # back: it issues the device's certificate again
    assert make(out).returncode == 0 and (out / "device.crt").exists()
    (out / "ca.crt").rename(tmp_path / "ca.crt")
    res = make(out)
    assert res.returncode == 1 and "ca.key is here without its certificate ca.crt" in res.stderr


def test_a_certificate_another_ca_signed_is_an_error_not_kept(tmp_path: Path) -> None:
    other, out = tmp_path / "other", tmp_path / "secrets"
    assert make(other).returncode == 0 and make(out).returncode == 0
    shutil.copy(other / "edge.crt", out / "edge.crt")
    res = make(out)
    assert res.returncode == 1 and "edge.crt was not signed by" in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("names", "needle"),
    [
        (["edge", "999.1.1.1"], "999.1.1.1 is no IPv4 address"),
        (["edge.example.org:50051"], "without a port (a NAME is not HOST:PORT)"),
        (["bad_name!"], "bad_name! is no DNS name or IP address"),
    ],
)
def test_a_bad_name_is_one_line_before_anything_is_made(tmp_path: Path, names: list[str], needle: str) -> None:
    """openssl's output is hidden: a name it cannot use failed with no message at all and left a key
    and a request behind. Each name is checked first."""
    res = make(tmp_path / "s", *names)
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert not (tmp_path / "s" / "edge.key").exists()


def test_a_directory_where_a_file_goes_is_named(tmp_path: Path) -> None:
    """`docker compose up` before this script makes each missing bind-mount source a directory:
    `-s` is true for one, so the script judged it an expired certificate and skipped the token."""
    (tmp_path / "s" / "edge.crt").mkdir(parents=True)
    res = make(tmp_path / "s")
    assert res.returncode == 2 and "edge.crt is a directory" in res.stderr, res.stderr


def test_a_kept_token_is_made_private_too(tmp_path: Path) -> None:
    """A token put there beforehand (e.g. the deployment's own, at 0644 under the usual umask) is
    kept, and made 0600 like the rest: as root it was handed to uid 10001 first and then left as
    it was (the chmod ran only on files root still owned)."""
    import os
    import stat

    out = tmp_path / "secrets"
    out.mkdir()
    (out / "token").write_text("the-deployments-own-token\n")
    (out / "token").chmod(0o644)
    res = make(out)
    assert res.returncode == 0, res.stderr
    st = (out / "token").stat()
    assert (out / "token").read_text() == "the-deployments-own-token\n"  # kept
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (10001, 10001)


def test_a_kept_certificate_without_its_key_is_an_error(tmp_path: Path) -> None:
    """An edge.crt kept without edge.key was reported made ("secrets in ...: ... edge.key") and
    the edge then failed at its start."""
    out = tmp_path / "secrets"
    assert make(out).returncode == 0
    (out / "edge.key").unlink()
    again = make(out)
    assert again.returncode == 1 and "edge.crt is here without its key edge.key" in again.stderr
    assert "secrets in" not in again.stdout


@pytest.mark.parametrize("days", ["2y", "0", "-5", ""])
def test_bad_certificate_days_are_one_line_before_anything_is_made(tmp_path: Path, days: str) -> None:
    out = tmp_path / "secrets"
    env = {**os.environ, "GELATO_CERT_DAYS": days}
    res = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env)
    if days == "":  # empty: the default, as ${VAR:-825} reads it
        assert res.returncode == 0, res.stderr
        return
    assert res.returncode == 2 and f"GELATO_CERT_DAYS={days} is not a whole number of days" in res.stderr
    assert not out.exists() or not any(out.iterdir())
