"""`--max-sessions-per-client`: one client's Session streams (open, or waiting for their open) are
bounded, others' are not. A client is its IP address (plaintext, or TLS without client
certificates) or, under mutual TLS, its certificate, so two devices behind one address are told
apart. Real edge processes, real gRPC streams held open; the naming rule
(`gelato.edge.clients.client_of`) on its own, with the peer strings gRPC really gives."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gelato.edge.clients import client_of
from gelato.models import LoadedModel
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess
from tests.edge.certs import make_pki
from tests.edge.test_batched_grpc import free_port, open_msg, scrape
from tests.edge.test_server_errors import iter_until_closed


class HeldStream:
    """A Session stream kept open between messages (`iter_until_closed` waits for the next one)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: list[pb.DeviceMessage] = []
        self._replies: Iterator[pb.EdgeMessage] = pb_grpc.GelatoStub(channel).Session(
            iter_until_closed(self._out), timeout=60
        )

    def open(self, fingerprint: str) -> pb.EdgeMessage:
        self._out.append(open_msg(fingerprint, 5, 8))
        return next(self._replies)

    def close(self) -> None:
        self._out.append(pb.DeviceMessage(close=pb.CloseSession()))
        assert list(self._replies) == []  # ended OK, nothing more said


def refused(stream: HeldStream, fingerprint: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stream.open(fingerprint)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    return info.value.details() or ""


def test_one_address_holds_at_most_its_limit(pair: dict[str, Path], drafter_model: LoadedModel) -> None:
    port = free_port()
    args = ["--target", str(pair["target"]), "--max-sessions-per-client", "2", "--metrics-port", str(port)]
    edge = EdgeProcess(args)
    fp = drafter_model.fingerprint
    try:
        with grpc.insecure_channel(edge.address) as channel:
            first, second = HeldStream(channel), HeldStream(channel)
            assert first.open(fp).HasField("opened") and second.open(fp).HasField("opened")
            details = refused(HeldStream(channel), fp)
            assert "this client (ip:127.0.0.1) holds 2 Session streams" in details, details
            assert "--max-sessions-per-client 2" in details
            first.close()  # its room comes back once it is closed
            third = HeldStream(channel)
            assert third.open(fp).HasField("opened")
            second.close()
            # A stream that sends no open counts too: a client's streams left waiting cannot fill
            # the edge's room for streams waiting to open.
            silent = HeldStream(channel)
            time.sleep(0.5)  # its call reaches the edge before the next one does
            assert "holds 2 Session streams" in refused(HeldStream(channel), fp)
            third.close()
            silent.close()
        m = scrape(port)
        assert m['gelato_edge_sessions_rejected_total{reason="client_limit"}'] == 2
        assert m['gelato_edge_sessions_rejected_total{reason="admission"}'] == 0
    finally:
        assert edge.stop() == 0


def test_under_mutual_tls_a_client_is_its_certificate(
    pair: dict[str, Path], drafter_model: LoadedModel, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ["--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"])]
    edge = EdgeProcess(
        ["--target", str(pair["target"]), *tls, "--tls-client-ca", str(pki["ca.crt"]), "--max-sessions-per-client", "1"]
    )
    fp = drafter_model.fingerprint

    def channel(stem: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            pki["ca.crt"].read_bytes(), pki[f"{stem}.key"].read_bytes(), pki[f"{stem}.crt"].read_bytes()
        )
        return grpc.secure_channel(edge.address.replace("127.0.0.1", "localhost"), credentials)

    try:
        with channel("client") as one, channel("client2") as two:
            held = HeldStream(one)
            assert held.open(fp).HasField("opened")
            details = refused(HeldStream(one), fp)
            assert "this client (cert:CN=gelato-device sha256:" in details, details
            other = HeldStream(two)  # the same address, another certificate: another client
            assert other.open(fp).HasField("opened")
            held.close()
            other.close()
    finally:
        assert edge.stop() == 0


PEM = b"-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"
PEM_SHA = "sha256:" + hashlib.sha256(PEM).hexdigest()[:16]


@pytest.mark.parametrize(
    ("peer", "auth", "client"),
    [
        ("ipv4:10.0.0.7:50412", {}, "ip:10.0.0.7"),
        ("ipv6:%5B::1%5D:50412", {}, "ip:::1"),  # as grpc 1.85 gives it: brackets escaped
        ("ipv6:[::1]:50412", {}, "ip:::1"),
        ("ipv6:%5B::ffff:10.0.0.7%5D:50412", {}, "ip:10.0.0.7"),  # IPv4 through a dual-stack listener
        ("ipv6:%5B64:ff9b::a00:7%5D:50412", {}, "ip:10.0.0.7"),  # IPv4 through a NAT64 gateway (not one /64)
        ("ipv6:%5B64:ff9b::a00:8%5D:50412", {}, "ip:10.0.0.8"),
        ("ipv6:%5Bfe80::1%25eth0%5D:7", {}, "ip:fe80::1%eth0"),  # link-local, with its zone
        ("ipv6:%5B2a00:1450:4001:81c::200e%5D:7", {}, "ip:2a00:1450:4001:81c::/64"),  # a global one: its /64
        ("ipv6:%5B2a00:1450:4001:81c:1:2:3:4%5D:7", {}, "ip:2a00:1450:4001:81c::/64"),
        ("unix:", {}, "unix:"),  # every Unix-socket peer, as gRPC names it
        (
            "ipv4:10.0.0.7:1",
            {"x509_subject": [b"CN=dev-1,O=fleet"], "x509_common_name": [b"dev-1"], "x509_pem_cert": [PEM]},
            f"cert:CN=dev-1,O=fleet {PEM_SHA}",
        ),
        ("ipv4:10.0.0.7:1", {"x509_common_name": [b"dev-1"]}, "cert:CN=dev-1"),
        # A certificate with an empty subject (SANs only): named by its SANs, told apart by its hash.
        (
            "ipv4:10.0.0.7:1",
            {
                "x509_subject": [b""],
                "x509_common_name": [b""],
                "x509_subject_alternative_name": [b"spiffe://fleet/dev-1"],
                "x509_pem_cert": [PEM],
            },
            f"cert:spiffe://fleet/dev-1 {PEM_SHA}",
        ),
        # TLS without a client certificate: the auth context names no subject, the address counts.
        ("ipv4:10.0.0.7:1", {"transport_security_type": [b"ssl"]}, "ip:10.0.0.7"),
    ],
)
def test_client_names(peer: str, auth: dict[str, list[bytes]], client: str) -> None:
    assert client_of(peer, auth) == client
