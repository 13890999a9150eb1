"""TLS, mutual TLS and the bearer token between real processes: the right credentials
work, every wrong one is refused with a precise status, health stays open, and an exposed
address is refused without TLS and a token unless --insecure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gelato.security import bearer_metadata, channel_credentials, token_matches
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
    other = make_pki(folder / "other", ca_name="another-ca")  # a CA the edge never trusted
    return {
        **files,
        "token": folder / "token",
        "wrong": folder / "wrong",
        "other_ca.crt": other["ca.crt"],
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


def test_exposed_address_with_insecure_starts(pair: dict[str, Path]) -> None:
    edge = EdgeProcess(["--target", str(pair["target"]), "--host", "0.0.0.0", "--insecure"])
    try:
        assert edge.address.startswith("0.0.0.0:")
    finally:
        edge.stop()
