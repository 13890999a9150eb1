"""TLS, mutual TLS and the bearer token between real processes: the right credentials
work, every wrong one is refused with a precise status, health stays open, and an exposed
address is refused without TLS and a token unless --insecure. The device never sends its token
in plaintext to an edge that is not on loopback unless --insecure (nor through an HTTP proxy), and
reaches TLS with gRPC's default roots (--tls, --tls-server-name). Bad token and TLS files are in
test_security_credential_files.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gelato.config import ConfigError
from gelato.edge.cli import exposure, with_security
from gelato.edge.config import EdgeConfig
from gelato.security import (
    SecurityConfigError,
    bearer_metadata,
    channel_credentials,
    check_token_transport,
    target_hosts,
    target_is_loopback,
    token_matches,
)
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess, run_device
from tests.edge.certs import make_pki

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    files = make_pki(folder)
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "wrong").write_text("not-the-token\n")
    (folder / "bom_token").write_bytes(b"\xef\xbb\xbf" + TOKEN.encode() + b"\r\n")  # as Notepad saves it
    (folder / "binary_token").write_bytes(b"\xff\xfeabc\n")  # UTF-16, or any binary file
    (folder / "garbage.pem").write_text("x\n")
    for name in ("token", "wrong", "bom_token", "binary_token"):
        (folder / name).chmod(0o600)  # as make-secrets.sh leaves a token (others' access only warns)
    other = make_pki(folder / "other", ca_name="another-ca")  # a CA the edge never trusted
    return {
        **files,
        "token": folder / "token",
        "wrong": folder / "wrong",
        "bom_token": folder / "bom_token",
        "binary_token": folder / "binary_token",
        "garbage.pem": folder / "garbage.pem",
        "other_ca.crt": other["ca.crt"],
        "other_server.key": other["server.key"],
        "other_client.crt": other["client.crt"],
        "other_client.key": other["client.key"],
    }


@pytest.fixture(scope="module")
def secure_edge(pair: dict[str, Path], pki: dict[str, Path]) -> EdgeProcess:
    tls = ["--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"])]
    proc = EdgeProcess(["--target", str(pair["target"]), *tls, "--auth-token-file", str(pki["token"])])
    yield proc
    proc.stop()


def device(pair: dict[str, Path], edge: EdgeProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["--drafter", str(pair["drafter_agree"]), "--edge", edge.address, "--prompt", "Ava has 3 apples."]
    return run_device([*args, "--max-new-tokens", "6", "--json", "--connect-timeout-s", "5", *extra])


def test_token_comparison() -> None:
    assert token_matches(bearer_metadata("abc"), "abc")
    assert not token_matches(bearer_metadata("abd"), "abc") and not token_matches((), "abc")
    assert not token_matches([("authorization", "Basic abc")], "abc")
    # RFC 7235: the scheme in any case, spaces before the credentials (as grpcurl -H users type it).
    for header in ("bearer abc", "BEARER abc", "Bearer  abc", " Bearer abc "):
        assert token_matches([("authorization", header)], "abc"), header
    for header in ("Bearerabc", "Bearer", "Bearer abc def", "Bearer ab"):
        assert not token_matches([("authorization", header)], "abc"), header


def test_tls_and_token_work_and_match_plaintext(
    pair: dict[str, Path], pki: dict[str, Path], secure_edge: EdgeProcess, edge: EdgeProcess
) -> None:
    res = device(pair, secure_edge, "--tls-ca", str(pki["ca.crt"]), "--auth-token-file", str(pki["token"]))
    assert res.returncode == 0, res.stderr
    plain = device(pair, edge)
    assert json.loads(res.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ([], "could not reach gelato-edge"),  # plaintext to a TLS port: no handshake
        (["--tls-ca", "other_ca.crt", "--auth-token-file", "token"], "check --tls-ca"),  # untrusted certificate
        (["--tls-ca", "ca.crt"], "UNAUTHENTICATED"),  # no token
        (["--tls-ca", "ca.crt", "--auth-token-file", "wrong"], "UNAUTHENTICATED"),
    ],
)
def test_wrong_credentials_are_refused(
    pair: dict[str, Path], pki: dict[str, Path], secure_edge: EdgeProcess, extra: list[str], needle: str
) -> None:
    args = [str(pki[a]) if a in pki else a for a in extra]
    res = device(pair, secure_edge, *args)
    assert res.returncode == 1 and needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_health_is_open_but_the_service_is_not(pki: dict[str, Path], secure_edge: EdgeProcess) -> None:
    creds = channel_credentials(pki["ca.crt"])
    with grpc.secure_channel(secure_edge.address, creds) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GelatoStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Info(pb.InfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:  # streaming calls too, before any message is read
            list(stub.Session(iter([pb.DeviceMessage()]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Info(pb.InfoRequest(), timeout=10, metadata=bearer_metadata(TOKEN)).vocab_size > 0
        # Health's Watch, a stream that never ends on its own, needs the token (open, anyone could
        # hold any number of them); Check is all a probe calls.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10, metadata=bearer_metadata(TOKEN)
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_a_method_the_edge_lacks_is_refused_alike_without_the_token(
    pki: dict[str, Path], secure_edge: EdgeProcess
) -> None:
    """Without the token, an unknown method was answered UNIMPLEMENTED and a real one
    UNAUTHENTICATED: a caller without the token could list the methods that exist."""
    with grpc.secure_channel(secure_edge.address, channel_credentials(pki["ca.crt"])) as channel:
        unknown = channel.unary_unary("/gelato.v1.Gelato/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:  # with the token: the method is not there
            unknown(b"", timeout=10, metadata=bearer_metadata(TOKEN))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls(pair: dict[str, Path], pki: dict[str, Path]) -> None:
    tls = ["--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"])]
    edge = EdgeProcess(["--target", str(pair["target"]), *tls, "--tls-client-ca", str(pki["ca.crt"])])
    try:
        ok = device(
            pair,
            edge,
            "--tls-ca",
            str(pki["ca.crt"]),
            "--tls-cert",
            str(pki["client.crt"]),
            "--tls-key",
            str(pki["client.key"]),
        )
        assert ok.returncode == 0, ok.stderr
        no_cert = device(pair, edge, "--tls-ca", str(pki["ca.crt"]))
        assert no_cert.returncode == 1 and "Traceback" not in no_cert.stderr
        assert "for an edge that wants client certificates --tls-cert/--tls-key" in no_cert.stderr, no_cert.stderr
        foreign = device(
            pair,
            edge,
            "--tls-ca",
            str(pki["ca.crt"]),
            "--tls-cert",
            str(pki["other_client.crt"]),
            "--tls-key",
            str(pki["other_client.key"]),
        )
        assert foreign.returncode == 1
    finally:
        edge.stop()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--host", "0.0.0.0"], "refusing to serve 0.0.0.0 without TLS and a token"),
        (["--tls-cert", "x.crt"], "--tls-cert and --tls-key go together"),
        (["--auth-token-file", "/nonexistent/token"], "token file /nonexistent/token"),
    ],
)
def test_edge_security_flags(args: list[str], needle: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "gelato.edge.cli", "--port", "0", *args], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and needle in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"tls_cert": "x.crt"}, "--tls-cert and --tls-key go together"),
        ({"tls_key": "x.key"}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": "ca.crt"}, "--tls-client-ca needs --tls-cert/--tls-key"),
        ({"auth_token_file": "token"}, "no token was read from it"),
    ],
)
def test_an_embedded_edge_server_fails_closed(settings: dict[str, str], needle: str) -> None:
    """`EdgeServer` built from a config that skipped the CLI's security step refuses to start
    instead of serving plaintext without the token or TLS its settings name."""
    from gelato.config import ConfigError
    from gelato.edge.config import EdgeConfig
    from gelato.edge.server import EdgeServer

    with pytest.raises(ConfigError, match=needle):
        EdgeServer(EdgeConfig(port=0, **settings))  # type: ignore[arg-type]


def test_exposure_names_what_an_exposed_edge_lacks() -> None:
    """A non-loopback edge needs TLS that knows its callers: a token or client certificates."""
    tls = {"tls_cert": "e.crt", "tls_key": "e.key"}
    assert exposure(EdgeConfig()) is None  # loopback
    assert exposure(EdgeConfig(host="0.0.0.0", **tls, auth_token="t")) is None
    assert exposure(EdgeConfig(host="0.0.0.0", **tls, tls_client_ca="ca.crt")) is None  # mutual TLS
    only_tls = exposure(EdgeConfig(host="0.0.0.0", **tls))
    assert only_tls is not None and only_tls[0] == "with TLS but without a token or client certificates"
    token_only = exposure(EdgeConfig(host="0.0.0.0", auth_token="t"))
    assert token_only is not None and "plaintext" in token_only[1]
    assert exposure(EdgeConfig(host="0.0.0.0")) == (
        "without TLS and a token",
        "anyone who reaches the port can use this edge",
    )


def test_an_exposed_edge_accepts_mutual_tls_without_a_token(pki: dict[str, Path]) -> None:
    """Client certificates authenticate the devices as a token does: no --insecure needed. TLS
    alone authenticates nobody: refused, saying what is missing."""
    tls = {"tls_cert": str(pki["server.crt"]), "tls_key": str(pki["server.key"])}
    mutual = with_security(EdgeConfig(host="0.0.0.0", **tls, tls_client_ca=str(pki["ca.crt"])))
    assert mutual.tls_client_ca and mutual.auth_token is None
    with pytest.raises(ConfigError, match=r"refusing to serve 0\.0\.0\.0 with TLS but without a token or client cert"):
        with_security(EdgeConfig(host="0.0.0.0", **tls))


@pytest.mark.parametrize("from_env", [False, True], ids=["flag", "variable"])
def test_exposed_address_with_insecure_starts_and_says_so(
    pair: dict[str, Path], from_env: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--insecure on an exposed address starts, with a warning at every start that names the
    variable when it came from one: a GELATO_EDGE_INSECURE left exported served 0.0.0.0 without
    a token, and nothing said so."""
    if from_env:
        monkeypatch.setenv("GELATO_EDGE_INSECURE", "1")
    edge = EdgeProcess(["--target", str(pair["target"]), "--host", "0.0.0.0", *([] if from_env else ["--insecure"])])
    try:
        assert edge.address.startswith("0.0.0.0:")
    finally:
        edge.stop()
    warning = [line for line in edge.output().splitlines() if "warning: serving 0.0.0.0 without TLS" in line]
    assert len(warning) == 1, edge.output()
    assert ("--insecure came from GELATO_EDGE_INSECURE='1'" in warning[0]) == from_env, warning


# --- the device's token never goes in plaintext off the machine; TLS with gRPC's default roots ----


@pytest.mark.parametrize(
    ("target", "hosts", "loopback"),
    [
        ("127.0.0.1:50051", ["127.0.0.1"], True),
        ("localhost:50051", ["localhost"], True),
        ("[::1]:50051", ["::1"], True),
        ("127.0.0.2:50051", ["127.0.0.2"], True),
        ("10.0.0.1:50051", ["10.0.0.1"], False),
        ("edge.example.org:50051", ["edge.example.org"], False),
        ("0.0.0.0:50051", ["0.0.0.0"], False),  # not provably this machine: treated as exposed
        ("[2001:db8::1]:50051", ["2001:db8::1"], False),
        ("dns:///localhost:50051", ["localhost"], True),
        ("dns:///edge:50051", ["edge"], False),
        ("dns://127.0.0.1:53/edge:50051", ["edge"], False),  # the authority is the DNS server, not the edge
        ("dns:localhost", ["localhost"], True),
        ("ipv4:127.0.0.1:50051,127.0.0.1:50052", ["127.0.0.1", "127.0.0.1"], True),
        ("ipv4:127.0.0.1:50051,10.0.0.2:50051", ["127.0.0.1", "10.0.0.2"], False),  # any one exposed: exposed
        ("ipv6:[::1]:50051,[2001:db8::2]:50051", ["::1", "2001:db8::2"], False),
        ("ipv6:::1", ["::1"], True),
        ("unix:/run/gelato/edge.sock", [], True),  # a local socket: no network at all
    ],
)
def test_target_hosts(target: str, hosts: list[str], loopback: bool) -> None:
    assert target_hosts(target) == hosts
    assert target_is_loopback(target) is loopback


def test_token_transport_rule() -> None:
    check_token_transport("10.0.0.1:50051", tls=True, token="t")  # TLS: fine
    check_token_transport("10.0.0.1:50051", tls=False, token=None)  # no token to leak
    check_token_transport("10.0.0.1:50051", tls=False, token="t", insecure=True)  # accepted explicitly
    check_token_transport("ipv4:127.0.0.1:1,127.0.0.1:2", tls=False, token="t")  # loopback only
    with pytest.raises(SecurityConfigError, match="refusing to send the bearer token"):
        check_token_transport("ipv4:127.0.0.1:1,10.0.0.1:2", tls=False, token="t")


def device_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def one_line_error(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and needle in res.stderr, res.stderr


@pytest.mark.parametrize(
    "target",
    [
        "192.0.2.1:50051",
        "edge.example.org:50051",
        "[2001:db8::1]:50051",
        "dns:///edge.example.org:50051",
        "ipv4:127.0.0.1:50051,192.0.2.1:50051",
        "ipv6:[::1]:50051,[2001:db8::1]:50051",
    ],
)
def test_device_refuses_a_plaintext_token_to_an_exposed_edge(pki: dict[str, Path], target: str) -> None:
    """Before any model load: a one-line usage error naming the flags that fix it."""
    res = device_cli(["--edge", target, "--prompt", "x", "--auth-token-file", str(pki["token"])])
    one_line_error(res, f"refusing to send the bearer token (--auth-token-file) in plaintext to {target}")
    assert all(flag in res.stderr for flag in ("--tls", "--tls-ca", "--insecure"))


def test_device_plaintext_token_on_loopback_or_with_insecure(
    pair: dict[str, Path], pki: dict[str, Path], edge: EdgeProcess
) -> None:
    """Loopback needs no TLS (the token never leaves the machine); elsewhere --insecure accepts it
    (the run then goes on to connect: nothing answers at the documentation address)."""
    ok = device(pair, edge, "--auth-token-file", str(pki["token"]))
    assert ok.returncode == 0, ok.stderr
    exposed = ["--drafter", str(pair["drafter_agree"]), "--edge", "192.0.2.1:50051", "--prompt", "x"]
    res = device_cli([*exposed, "--auth-token-file", str(pki["token"]), "--insecure", "--connect-timeout-s", "1"])
    assert res.returncode == 1 and "could not reach gelato-edge at 192.0.2.1:50051" in res.stderr, res.stderr
    plaintext = "warning: sending the bearer token in plaintext to 192.0.2.1:50051"
    assert plaintext in res.stderr and "GELATO_DEVICE_INSECURE" not in res.stderr, res.stderr
    env = device_cli(
        ["--edge", "192.0.2.1:50051", "--prompt", "x", "--auth-token-file", str(pki["token"])],
        env={"GELATO_DEVICE_INSECURE": "1", "GELATO_DEVICE_CONNECT_TIMEOUT_S": "1"},
    )
    assert env.returncode == 1 and "refusing" not in env.stderr, env.stderr
    # Said at every run, naming the variable: an exported GELATO_DEVICE_INSECURE would pass unnoticed.
    warning = [line for line in env.stderr.splitlines() if plaintext in line]
    assert len(warning) == 1 and "--insecure came from GELATO_DEVICE_INSECURE='1'" in warning[0], env.stderr
    assert "warning" not in ok.stderr  # loopback: nothing to warn about


@pytest.mark.parametrize("tls_flags", [["--tls"], ["--tls-server-name", "localhost"]])
def test_device_tls_with_the_default_roots(
    pair: dict[str, Path], pki: dict[str, Path], secure_edge: EdgeProcess, tls_flags: list[str]
) -> None:
    """--tls, or --tls-server-name alone, is TLS trusting gRPC's default roots (no --tls-ca): with
    the test CA as those roots (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH) the run works; with grpcio's own
    roots the handshake fails (the device did try TLS, never plaintext)."""
    args = ["--drafter", str(pair["drafter_agree"]), "--edge", secure_edge.address, "--prompt", "Ava has 3 apples."]
    args += ["--max-new-tokens", "6", "--json", "--connect-timeout-s", "5", "--auth-token-file", str(pki["token"])]
    ok = device_cli([*args, *tls_flags], env={"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki["ca.crt"])})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["n_tokens"] > 0
    untrusted = device_cli([*args, *tls_flags, "--connect-timeout-s", "2"])
    assert untrusted.returncode == 1 and "with TLS also check --tls-ca" in untrusted.stderr, untrusted.stderr


class _FakeProxy:
    """A TCP listener standing in for an HTTP proxy: records whether anything connected."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(4096))
                except OSError:
                    self.received.append(b"")


def test_plaintext_channels_never_go_through_an_http_proxy(
    pair: dict[str, Path], pki: dict[str, Path], edge: EdgeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a proxy in the environment (gRPC honours it for every target, loopback included), the
    device's plaintext channel to a loopback edge still goes straight to the edge: its bearer
    token went to the proxy in plaintext (`CONNECT 127.0.0.1:...`, then the HTTP/2 stream), and
    so did the image's health check, which never reached the edge then."""
    proxy = _FakeProxy()
    for name in ("grpc_proxy", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    ran = device(pair, edge, "--auth-token-file", str(pki["token"]))
    check = subprocess.run(
        [sys.executable, "-m", "gelato.edge.cli", "--health-check", edge.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    proxy.sock.close()
    assert ran.returncode == 0, ran.stderr
    assert check.returncode == 0 and "SERVING" in check.stdout, check.stderr
    assert proxy.received == [], proxy.received
