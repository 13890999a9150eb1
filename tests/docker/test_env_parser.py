"""`EnvArgumentParser`: every option also settable by an environment variable (containers), the
command line winning, bad values named by their variable. A parser with each kind of option."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gelato.cli_common import EnvArgumentParser, byte_size, max_memory, port_number


def make_parser() -> EnvArgumentParser:
    p = EnvArgumentParser(prog="tool", env_prefix="TOOL", env_skip={"once"})
    p.add_argument("--port", type=port_number, default=50051)
    p.add_argument("--rate-hz", type=float, default=1.5)
    p.add_argument("--level", type=str.upper, choices=["LOW", "HIGH"], default="LOW")
    p.add_argument("--path", type=Path, default=None)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--tag", action="append")
    p.add_argument("--sizes", nargs="+", type=int, default=[1])
    p.add_argument("--once", action="store_true", help="an action, not a setting: no variable")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--file")
    return p


def parse(monkeypatch: pytest.MonkeyPatch, argv: list[str], **env: str) -> argparse.Namespace:
    for name in ("TOOL_PORT", "TOOL_RATE_HZ", "TOOL_LEVEL", "TOOL_PATH", "TOOL_VERBOSE", "TOOL_TAG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return make_parser().parse_args(argv)


def test_variables_set_every_kind_of_option(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"TOOL_PORT": "8080", "TOOL_RATE_HZ": "2.5", "TOOL_LEVEL": "high", "TOOL_PATH": "/tmp/x"}
    env |= {"TOOL_VERBOSE": "yes", "TOOL_TAG": "a b", "TOOL_SIZES": "3 4", "TOOL_FILE": "f.jsonl"}
    ns = parse(monkeypatch, [], **env)
    assert (ns.port, ns.rate_hz, ns.level, ns.path, ns.verbose) == (8080, 2.5, "HIGH", Path("/tmp/x"), True)
    assert ns.tag == ["a b"] and ns.sizes == [3, 4] and ns.file == "f.jsonl" and ns.text is None
    defaults = parse(monkeypatch, ["--text", "t"])
    assert (defaults.port, defaults.rate_hz, defaults.level, defaults.verbose, defaults.tag) == (
        50051,
        1.5,
        "LOW",
        False,
        None,
    )


def test_command_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"TOOL_PORT": "8080", "TOOL_VERBOSE": "1", "TOOL_TAG": "env", "TOOL_FILE": "f.jsonl", "TOOL_SIZES": "9"}
    ns = parse(monkeypatch, ["--port", "9090", "--tag", "cli", "--text", "t", "--sizes", "5"], **env)
    assert ns.port == 9090 and ns.tag == ["cli"] and ns.sizes == [5]  # not ["env", "cli"]
    assert ns.text == "t" and ns.file is None  # a group member on the command line silences the group's variables
    assert ns.verbose is True  # not given on the command line: the variable holds
    off = parse(monkeypatch, ["--text", "t"], TOOL_VERBOSE="off")
    assert off.verbose is False


def test_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    ns = parse(monkeypatch, ["--text", "t"], TOOL_PORT="", TOOL_PATH="")
    assert ns.port == 50051 and ns.path is None
    # Blank as well (a templated env file's `PORT= ` or `${VAR:- }`): unset, not an invalid int.
    ns = parse(monkeypatch, ["--text", "t"], TOOL_PORT=" ", TOOL_PATH="\t")
    assert ns.port == 50051 and ns.path is None


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"TOOL_PORT": "70000"}, "environment variable TOOL_PORT='70000': port must be in 0-65535, got 70000"),
        ({"TOOL_RATE_HZ": "fast"}, "environment variable TOOL_RATE_HZ='fast': invalid float value"),
        (
            {"TOOL_LEVEL": "mid"},
            "variable TOOL_LEVEL='mid': invalid choice: 'MID' (choose from 'LOW', 'HIGH')",
        ),
        ({"TOOL_VERBOSE": "2"}, "environment variable TOOL_VERBOSE='2': expected 1/0, true/false, yes/no or on/off"),
        ({"TOOL_SIZES": "1 x"}, "environment variable TOOL_SIZES='1 x': invalid int value"),
        ({"TOOL_TEXT": "t", "TOOL_FILE": "f"}, "environment variables TOOL_TEXT and TOOL_FILE are mutually exclusive"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str], needle: str
) -> None:
    argv = [] if "TOOL_TEXT" in env else ["--text", "t"]
    with pytest.raises(SystemExit) as exc:
        parse(monkeypatch, argv, **env)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_required_group_still_required(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(monkeypatch, [])
    assert "one of the arguments --text --file is required" in capsys.readouterr().err


def test_skipped_and_help(monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_parser()
    assert "--once" not in p.env_names() and p.env_names()["--rate-hz"] == "TOOL_RATE_HZ"
    monkeypatch.setenv("TOOL_ONCE", "1")  # no such variable: ignored
    assert p.parse_args(["--text", "t"]).once is False
    text = " ".join(p.format_help().split())
    assert "[env: TOOL_PORT]" in text and "[env: TOOL_ONCE]" not in text
    assert "TOOL_<OPTION>" in text and "--port: TOOL_PORT" in text
    assert p.format_help() == p.format_help()  # notes added once


def test_sizes_and_max_memory() -> None:
    assert byte_size("20GiB") == 20 * 2**30 and byte_size("1.5GB") == 1_500_000_000 and byte_size("4096") == 4096
    assert max_memory("0=70GiB, cuda:1=70GiB,cpu=200GB") == {0: 70 * 2**30, 1: 70 * 2**30, "cpu": 200 * 10**9}
    for bad, why in [("cpu=0", "must be > 0"), ("cpu=5XB", "not a size"), ("disk=1G", "unknown device 'disk'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            max_memory(bad)


def test_explain_names_the_variable_behind_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """A settings error about a flag the parse took from the environment names that variable; a
    flag typed on the command line, or one the message only starts like, is left as is."""
    for name in ("TOOL_PORT", "TOOL_RATE_HZ", "TOOL_LEVEL", "TOOL_PATH", "TOOL_VERBOSE", "TOOL_TAG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOOL_RATE_HZ", "0")
    monkeypatch.setenv("TOOL_PORT", "8080")
    p = make_parser()
    p.parse_args(["--text", "t", "--port", "9090"])
    assert p.from_env == {"--rate-hz": "TOOL_RATE_HZ='0'"}
    assert p.explain("--rate-hz must be > 0") == "--rate-hz must be > 0 (--rate-hz came from TOOL_RATE_HZ='0')"
    assert p.explain("--port must be > 9090") == "--port must be > 9090"  # typed: the command line won
    assert p.explain("--rate-hz-max must be > 0") == "--rate-hz-max must be > 0"
    monkeypatch.delenv("TOOL_RATE_HZ")
    p.parse_args(["--text", "t"])
    assert p.from_env == {"--port": "TOOL_PORT='8080'"}  # each parse starts afresh
    monkeypatch.setenv("TOOL_FILE", "f.jsonl")
    p.parse_args(["--text", "t"])  # a group member typed: the rival's variable is silenced, and said so
    assert p.silenced == {"--file": "TOOL_FILE='f.jsonl'"} and "--file" not in p.from_env
