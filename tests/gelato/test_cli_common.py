"""`gelato.cli_common`: what `--edge` accepts (`endpoint`), and which variable a settings error
names (`explain`). A malformed gRPC target must be refused with a precise message: gRPC core
takes one without an error, and its channel then never connects nor lets the process exit."""

from __future__ import annotations

import argparse

import pytest

from gelato.cli_common import endpoint


@pytest.mark.parametrize(
    "text",
    [
        "edge:50051",
        "[::1]:50051",
        "dns:///edge.example.org:50051",
        "dns:edge:1",
        "dns://8.8.8.8/edge:50051",
        "ipv4:127.0.0.1:50051,10.0.0.2:50052",
        "ipv6:[::1]:50051,[2001:db8::2]:50051",
        "unix:/run/gelato.sock",
    ],
)
def test_accepted_targets_are_returned_unchanged(text: str) -> None:
    assert endpoint(text) == text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("ipv4:abc", "needs :PORT"),
        ("ipv4:127.0.0.1", "needs :PORT"),
        ("ipv4:127.0.0.1:50051,10.0.0.2", "needs :PORT (1-65535): '10.0.0.2'"),
        ("ipv4:127.0.0.1:0", "needs :PORT"),
        ("ipv4:[::1]:50051", "not an IPv4"),
        ("ipv6:127.0.0.1:50051", "not an IPv6"),
        ("dns:///localhost", "needs :PORT"),
        ("dns:", "needs addresses after the scheme"),
        ("http://edge:50051", "dns:///HOST:PORT"),
        ("edge", "expected HOST:PORT"),
    ],
)
def test_malformed_targets_are_refused_precisely(text: str, needle: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=None) as info:
        endpoint(text)
    assert needle in str(info.value)


def test_a_check_naming_its_field_first_names_the_variable_behind_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`top_p must be ...` (the sampling check names its field, not the flag) came from
    GELATO_DEVICE_TOP_P: the message says so, as it does for `--top-p must be ...`; a field named
    elsewhere in a message is no match."""
    from gelato.device.cli import build_parser

    monkeypatch.setenv("GELATO_DEVICE_TOP_P", "nan")
    monkeypatch.setenv("GELATO_DEVICE_SEED", "3")
    parser = build_parser()
    parser.parse_args(["--prompt", "x"])
    assert parser.explain("top_p must be in [0, 1], got nan") == (
        "top_p must be in [0, 1], got nan (--top-p came from GELATO_DEVICE_TOP_P='nan')"
    )
    assert parser.explain("the seed top_p is fine") == "the seed top_p is fine"


@pytest.mark.parametrize("port", ["5_0051", "+5", "٥٠٠٥١", "50051.0", "-1"])
def test_a_port_is_ascii_digits(port: str) -> None:
    """int() takes these; gRPC's address parser does not ("Failed to parse port"): the device
    then waited out --connect-timeout-s and reported the edge unreachable."""
    from gelato.cli_common import port_number

    with pytest.raises(argparse.ArgumentTypeError, match="not a port number"):
        port_number(port)
    with pytest.raises(argparse.ArgumentTypeError, match="not a port number"):
        endpoint(f"127.0.0.1:{port}")
    assert port_number("50051") == 50051
    assert port_number(" 50051\r") == 50051  # a CRLF env file's value, as int() reads it
    with pytest.raises(argparse.ArgumentTypeError, match="not a port number"):
        endpoint("127.0.0.1: 50051")  # but not inside the address gRPC gets as written


def test_a_size_too_large_for_a_float_is_a_usage_error() -> None:
    """`float()` of hundreds of digits is inf, and int(inf) raised OverflowError past argparse (a
    traceback, exit 1) instead of the usage error of every other bad size."""
    from gelato.cli_common import max_memory

    with pytest.raises(argparse.ArgumentTypeError, match="too large"):
        max_memory("0=" + "9" * 400)
    assert max_memory("0=1.5GB,cpu=4096") == {0: 1_500_000_000, "cpu": 4096}
