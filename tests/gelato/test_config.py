"""Typed settings (`gelato.config`): options, variables and help made from one dataclass, defaults
written once, validation naming the flag; `EdgeConfig` and `DeviceConfig` through their parsers."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gelato.cli_common import EnvArgumentParser, port_number
from gelato.config import PORT, ConfigError, Settings, add_arguments, between, ge, gt, nested, require, setting
from gelato.device.cli import build_parser as device_parser
from gelato.device.config import DeviceConfig
from gelato.device.policy import PolicyOptions
from gelato.edge.cli import build_parser as edge_parser
from gelato.edge.config import EdgeConfig


@pytest.fixture(autouse=True)
def _no_gelato_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("GELATO_EDGE_", "GELATO_DEVICE_", "TOY_")):
            monkeypatch.delenv(name)


@dataclass(frozen=True)
class Inner(Settings):
    ratio: float = setting(0.5, "a ratio", check=between(0, 1))
    scale: float | None = setting(None, "a scale", flag="--scale-factor", check=gt(0, finite=True))
    internal: int = 7  # not an option


@dataclass(frozen=True)
class Toy(Settings):
    name: str = setting("x", "a name, 100% plain")
    port: int = setting(50051, "a port", type=port_number, check=PORT)
    count: int = setting(3, "how many", check=ge(1))
    mode: str = setting("a", "a mode", choices=("a", "b", "c"))
    verbose: bool = setting(False, "say more")
    item: list[str] | None = setting(None, "an item (repeatable)", action="append", one_of="src", required=True)  # noqa: RUF009 (a field)
    path: Path | None = setting(None, "a file", one_of="src", required=True)  # noqa: RUF009 (a field)
    inner: Inner = nested(Inner)  # noqa: RUF009 (a field)
    secret: str | None = field(default=None, repr=False)

    def check(self) -> None:
        require(not (self.verbose and self.mode == "c"), "--verbose and --mode c exclude each other")


def toy_parser() -> argparse.ArgumentParser:
    p = EnvArgumentParser(prog="toy", env_prefix="TOY")
    Toy.add_arguments(p)
    return p


def test_options_from_fields() -> None:
    p = toy_parser()
    flags = {o for a in p._actions for o in a.option_strings} - {"-h", "--help"}
    assert flags == {
        "--name",
        "--port",
        "--count",
        "--mode",
        "--verbose",
        "--item",
        "--path",
        "--ratio",
        "--scale-factor",
    }
    toy = Toy.from_args(p.parse_args(["--item", "a", "--item", "b", "--scale-factor", "2", "--verbose"]))
    assert toy == Toy(item=["a", "b"], inner=Inner(scale=2.0), verbose=True)
    assert Toy.from_args(p.parse_args(["--path", "f"])).path == Path("f")
    text = " ".join(p.format_help().split())
    assert "a name, 100% plain (default: x)" in text and "how many (default: 3)" in text
    assert "a ratio (default: 0.5)" in text and "[env: TOY_SCALE_FACTOR]" in text
    assert "say more [env: TOY_VERBOSE]" in text  # a switch shows no default
    assert "--scale-factor SCALE_FACTOR" in text  # named after its flag, not the field


def test_variables_and_argparse_types(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOY_COUNT", "5")
    monkeypatch.setenv("TOY_ITEM", "one")
    monkeypatch.setenv("TOY_RATIO", "0.25")
    toy = Toy.from_args(toy_parser().parse_args(["--count", "6"]))
    assert (toy.count, toy.item, toy.inner.ratio) == (6, ["one"], 0.25)  # the command line wins
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--item", "a", "--port", "70000"])
    assert "argument --port: port must be in 0-65535, got 70000" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("toy", "message"),
    [
        (Toy(item=["a"], count=0), "--count must be >= 1, got 0"),
        (Toy(item=["a"], port=-1), "--port must be in 0-65535, got -1"),
        (Toy(item=["a"], mode="z"), "--mode must be a, b or c"),
        (Toy(item=["a"], inner=Inner(ratio=1.0)), "--ratio must be in (0, 1), got 1.0"),
        (Toy(item=["a"], inner=Inner(ratio=float("nan"))), "--ratio must be in (0, 1), got nan"),
        (Toy(item=["a"], inner=Inner(scale=float("inf"))), "--scale-factor must be > 0, got inf"),
        (Toy(item=["a"], path=Path("f")), "--item and --path exclude each other"),
        (Toy(), "one of --item or --path is required"),
        (Toy(item=["a"], verbose=True, mode="c"), "--verbose and --mode c exclude each other"),
    ],
)
def test_validation_names_the_flag(toy: Toy, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        toy.validate()
    assert str(info.value) == message


def test_valid_and_unset_values_pass() -> None:
    Toy(item=["a"]).validate()
    Toy(item=["a"], count=10**400).validate()  # an int is finite (math.isfinite of it overflows)
    Toy(path=Path("f"), inner=Inner(scale=None)).validate()  # None: not set, no bound applies


def test_declaration_mistakes_are_caught() -> None:
    @dataclass
    class OnSwitch:
        flag: bool = setting(True, "a switch that is on by default")

    @dataclass
    class Untyped:
        limits: dict[str, int] | None = setting(None, "needs a parser")  # noqa: RUF009 (a field)

    for cls in (OnSwitch, Untyped):
        with pytest.raises(ValueError):
            add_arguments(argparse.ArgumentParser(), cls)


# --- the two programs ------------------------------------------------------------------------------


def test_edge_defaults_written_once() -> None:
    assert EdgeConfig.from_args(edge_parser().parse_args([])) == EdgeConfig()
    EdgeConfig().validate()
    assert "auth_token" not in {a.dest for a in edge_parser()._actions}  # read from its file, not an option
    assert "secret" not in repr(EdgeConfig(auth_token="secret"))


def test_the_drafter_samples_with_the_values_the_edge_gets() -> None:
    """Temperature and top_p reach the edge as float32: the drafter (and an in-process verifier)
    used the float64 values given, so at a nucleus boundary the two sides could keep different
    tokens; a top_p that float32 rounds to "off" is still refused, naming the value given."""
    from gelato.types import as_float32
    from gelato.wire import decode_sampling, encode_sampling

    config = DeviceConfig(prompt=["x"], temperature=0.7, top_p=0.9, top_k=40, seed=3)
    config.validate()
    assert config.sampling == decode_sampling(encode_sampling(config.sampling))
    assert config.sampling.top_p == as_float32(0.9) != 0.9 and config.sampling.temperature == as_float32(0.7)
    with pytest.raises(ConfigError, match=r"top_p 0\.99999999 is 'off' once on the wire"):
        DeviceConfig(prompt=["x"], temperature=0.7, top_p=0.99999999).validate()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--max-draft-tokens", "0"], "--max-draft-tokens must be >= 1"),
        (["--max-ahead-rounds", "-1"], "--max-ahead-rounds must be >= 0"),
        (["--batch-window-ms", "-1"], "--batch-window-ms must be >= 0"),
        (["--idle-timeout-s", "nan"], "--idle-timeout-s must be > 0"),
        (["--shutdown-grace-s", "-1"], "--shutdown-grace-s must be >= 0"),
        # argparse's float takes "inf": an infinite budget crashed the server's int() of it, an
        # infinite window held one session's block until another's came, an infinite grace never ended
        (["--kv-budget-mb", "inf"], "--kv-budget-mb must be >= 0"),
        (["--batch-window-ms", "inf"], "--batch-window-ms must be >= 0"),
        (["--batch-window-ms", "10001"], "--batch-window-ms must be <= 10000"),
        (["--shutdown-grace-s", "inf"], "--shutdown-grace-s must be >= 0"),
        (["--idle-timeout-s", "inf"], "--idle-timeout-s must be > 0"),
        (["--health-check-timeout-s", "0"], "--health-check-timeout-s must be > 0"),
        # gRPC fails a call at once when its timeout is far out (1e20 s): refused at start
        (["--health-check-timeout-s", "1e20"], "--health-check-timeout-s must be <= 10000000"),
        (["--threads", "0"], "--threads must be >= 1"),
        # torch takes a C int: 2**32 wrapped to 0 and failed inside torch with a traceback
        (["--threads", str(2**32)], "--threads must be <= 4096"),
        # gRPC/prometheus would bind a random port for 0 and no line would name it (unlike --port's)
        (["--metrics-port", "0"], "--metrics-port must be >= 1 (0 would pick a port nobody is told)"),
        (["--health-port", "0"], "--health-port must be >= 1 (0 would pick a port nobody is told)"),
        (["--offload-folder", "/tmp/x"], "--max-memory and --offload-folder need --device-map"),
        # Given empty ("$CERT" with the variable unset), read as not given: TLS or the token off.
        (["--tls-cert", "", "--tls-key", ""], "--tls-cert must name a file (leave it out for none)"),
        (["--tls-cert", "c.pem", "--tls-key", " "], "--tls-key must name a file (leave it out for none)"),
        (["--auth-token-file", ""], "--auth-token-file must name a file (leave it out for none)"),
        (["--tls-client-ca", ""], "--tls-client-ca must name a file (leave it out for none)"),
        (["--device-map", "auto", "--offload-folder", ""], "--offload-folder must name a folder"),
        # A stream waiting for its open is idle: a longer open timeout was silently cut.
        (
            ["--open-timeout-s", "600"],
            "--open-timeout-s 600 would be cut to --idle-timeout-s 300: a stream waiting for its open is idle "
            "(give an --idle-timeout-s at least as long)",
        ),
        (
            ["--open-timeout-s", "20", "--idle-timeout-s", "10"],
            "--open-timeout-s 20 would be cut to --idle-timeout-s 10: a stream waiting for its open is idle "
            "(give an --idle-timeout-s at least as long)",
        ),
        (
            ["--device-map", "auto", "--device", "cpu"],
            "--device cpu and --device-map exclude each other: the map places the model",
        ),
    ],
)
def test_edge_validation(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        EdgeConfig.from_args(edge_parser().parse_args(args)).validate()
    assert str(info.value) == message or str(info.value).startswith(message + ", got "), info.value


def test_edge_metrics_host_is_its_own_setting() -> None:
    """Metrics (plaintext, no token) bind --metrics-host, loopback by default, not --host."""
    config = EdgeConfig.from_args(edge_parser().parse_args(["--host", "0.0.0.0", "--metrics-port", "9100"]))
    assert config.metrics_host == "127.0.0.1" and config.host == "0.0.0.0"
    exposed = edge_parser().parse_args(["--metrics-port", "9100", "--metrics-host", "0.0.0.0"])
    assert EdgeConfig.from_args(exposed).metrics_host == "0.0.0.0"
    assert edge_parser().env_names()["--metrics-host"] == "GELATO_EDGE_METRICS_HOST"  # type: ignore[attr-defined]


def test_kubernetes_service_links_are_not_port_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Service named `gelato-edge` (or `gelato-edge-health`, `-metrics`) makes Kubernetes set
    GELATO_EDGE_PORT=tcp://IP:PORT in every pod: skipped with a warning that says what to do,
    the default kept; every start (the health probe's too) failed 'not a port number'. A value
    that is no service link is still refused."""
    monkeypatch.setenv("GELATO_EDGE_PORT", "tcp://10.96.0.7:50051")
    monkeypatch.setenv("GELATO_EDGE_HEALTH_PORT", "tcp://10.96.0.8:50052")
    config = EdgeConfig.from_args(edge_parser().parse_args([]))
    assert (config.port, config.health_port) == (50051, None)
    err = capsys.readouterr().err
    assert "ignoring GELATO_EDGE_PORT='tcp://10.96.0.7:50051': a Kubernetes service link" in err
    assert "set --port, or enableServiceLinks: false" in err and "GELATO_EDGE_HEALTH_PORT" in err
    monkeypatch.setenv("GELATO_EDGE_PORT", "http://x:1")
    with pytest.raises(SystemExit):
        edge_parser().parse_args([])
    assert "not a port number" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "tls"),
    [
        ([], False),
        (["--auth-token-file", "token"], False),
        (["--tls"], True),  # gRPC's default roots
        (["--tls-server-name", "edge"], True),  # a name to check means a certificate to check
        (["--tls-ca", "ca.crt"], True),
        (["--tls-cert", "c.crt", "--tls-key", "c.key"], True),
    ],
)
def test_device_tls_is_on_with_any_tls_setting(args: list[str], tls: bool) -> None:
    config = DeviceConfig.from_args(device_parser().parse_args(["--prompt", "x", *args]))
    assert config.uses_tls is tls and config.insecure is False


def test_device_defaults_written_once() -> None:
    config = DeviceConfig.from_args(device_parser().parse_args(["--prompt", "x"]))
    assert config == DeviceConfig(prompt=["x"])
    assert config.controller == PolicyOptions()  # the controller's constants are PolicyOptions' own
    config.validate()
    assert config.sampling.greedy and config.sampling.seed == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--top-m", "0"], "--top-m must be >= 1"),
        (["--limit", "-1"], "--limit must be >= 0"),
        (["--limit", "0"], "--limit must be >= 1 (0 runs no prompt)"),  # once "no prompts given"
        (["--max-new-tokens", str(2**32)], "--max-new-tokens must be <= 4294967295"),
        (["--failovers", "-1"], "--failovers must be >= 0"),
        (["--connect-timeout-s", "0"], "--connect-timeout-s must be > 0"),
        (["--v", "0"], "--v must be > 0"),
        (["--v", "inf"], "--v must be > 0"),
        (["--k-max", "-1"], "--k-max must be >= 0"),
        (["--energy-budget-j-per-token", "0"], "--energy-budget-j-per-token must be > 0"),
        (["--energy-budget-j-per-token", "inf"], "--energy-budget-j-per-token must be > 0"),
        (["--energy-budget-j-per-token", "1", "--meter", "none"], "--energy-budget-j-per-token needs energy"),
        (["--connect-timeout-s", "inf"], "--connect-timeout-s must be > 0"),
        (["--connect-timeout-s", "1e20"], "--connect-timeout-s must be <= 10000000"),
        (["--verdict-timeout-s", "0"], "--verdict-timeout-s must be > 0"),
        (["--verdict-timeout-s", "1e20"], "--verdict-timeout-s must be <= 10000000"),
        (["--session-deadline-s", "nan"], "--session-deadline-s must be > 0"),
        (["--session-deadline-s", "1e20"], "--session-deadline-s must be <= 10000000"),
        (["--estimator-halflife-rounds", "inf"], "--estimator-halflife-rounds must be > 0"),
        (["--adaedl-lambda", "1"], "--adaedl-lambda must be in (0, 1)"),
        (["--estimator-halflife-rounds", "0"], "--estimator-halflife-rounds must be > 0"),
        (["--ahead-blocks", "0"], "--ahead-blocks must be >= 1"),
        (["--policy", "bogus"], "unknown policy 'bogus'"),
        (["--temperature", "-1"], "temperature must be 0 (greedy) or finite"),
        (["--seed", "-1"], "seed must be in [0, 2^64)"),  # once every prompt failed encoding it
        # The wire's float32 would read these as 0 / 1 (off) while the drafter truncates at them.
        (["--temperature", "1", "--top-p", "1e-46"], "top_p 1e-46 is 'off' once on the wire (float32 0)"),
        (["--temperature", "1", "--top-p", "0.99999999"], "top_p 0.99999999 is 'off' once on the wire (float32 1)"),
        # Settings that would be ignored are refused.
        (["--limit", "3"], "--limit counts the prompts of --prompts-file"),
        (["--seed", "3"], "--seed shapes sampling only; --temperature 0 decodes greedily and would ignore it"),
        (["--top-p", "0.9", "--top-k", "5"], "--top-p, --top-k shape sampling only"),
        (["--top-m", "8"], "--top-m shapes sampling only"),
        (
            ["--policy", "ar-edge", "--pipeline", "send-ahead"],
            "--pipeline send-ahead pipelines drafting; --policy ar-edge",
        ),
        (["--policy", "ar-device", "--pipeline", "local"], "--pipeline local pipelines drafting; --policy ar-device"),
        # A policy's own setting, changed for a policy that never reads it.
        (["--policy", "gelato", "--entropy-threshold", "2"], "--entropy-threshold is read by --policy entropy only"),
        (["--policy", "entropy", "--adaedl-lambda", "0.3"], "--adaedl-lambda is read by --policy adaedl only"),
        (["--policy", "heuristic", "--adaedl-gamma", "0.3"], "--adaedl-gamma is read by --policy adaedl only"),
        (["--policy", "fixed-4", "--v", "5"], "--v is read by --policy lyapunov and gelato only; --policy fixed-4"),
        (
            ["--policy", "fixed-4", "--estimator-halflife-rounds", "5"],
            "--estimator-halflife-rounds is read by --policy lyapunov and gelato only; --policy fixed-4",
        ),
        (
            ["--policy", "entropy", "--pipeline", "send-ahead", "--calibrator-halflife-tokens", "100"],
            "--calibrator-halflife-tokens is read by --policy lyapunov and gelato only; --policy entropy",
        ),
        (["--tls-ca", ""], "--tls-ca must name a file (leave it out for none)"),
        (["--tls-server-name", ""], "--tls-server-name must name a host"),
        (["--auth-token-file", " "], "--auth-token-file must name a file (leave it out for none)"),
        (["--tls-cert", "", "--tls-key", ""], "--tls-cert must name a file (leave it out for none)"),
        (["--ahead-blocks", "3"], "--ahead-blocks is read with --pipeline send-ahead only (here --pipeline off)"),
        (["--policy", "fixed-0", "--stream-tokens", "1"], "--stream-tokens is read by --policy ar-edge only"),
        (["--policy", "ar-edge", "--stream-tokens", "0"], "--stream-tokens must be >= 1"),
        (["--policy", "ar-edge", "--stream-tokens", "257"], "--stream-tokens must be <= 256"),
        # V weighs throughput against the deficit: without a budget there is none, whatever V.
        (["--policy", "lyapunov", "--v", "5"], "--v weighs throughput against the energy deficit; without"),
        (["--device-profile", "laptop", "--meter", "rapl"], "--device-profile shapes the cpu-model estimate"),
        (["--device-profile", "laptop", "--meter", "none"], "--device-profile shapes the cpu-model estimate"),
        # Caps and pipelining of drafts, for a policy that sends none (ar-device drafts for itself).
        (["--policy", "ar-device", "--k-max", "4"], "--k-max caps the drafts a round sends for verification"),
        (["--policy", "ar-edge", "--k-max", "4"], "--k-max caps the drafts a round sends for verification"),
        (["--policy", "fixed-0", "--k-max", "4"], "--k-max caps the drafts a round sends for verification"),
        (["--policy", "fixed-0", "--pipeline", "local"], "--pipeline local pre-drafts the next block during a"),
        (["--policy", "ar-edge", "--temperature", "1", "--top-m", "8"], "--top-m shapes the drafter's sampled"),
        (["--policy", "fixed-0", "--temperature", "1", "--top-m", "8"], "--top-m shapes the drafter's sampled"),
    ],
)
def test_device_validation(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceConfig.from_args(device_parser().parse_args(["--prompt", "x", *args])).validate()
    assert str(info.value).startswith(message), info.value


@pytest.mark.parametrize(
    "args",
    [
        ["--policy", "entropy", "--entropy-threshold", "2"],
        ["--policy", "adaedl", "--adaedl-lambda", "0.3", "--adaedl-gamma", "0.5"],
        ["--policy", "lyapunov", "--v", "5", "--energy-budget-j-per-token", "0.01"],
        ["--device-profile", "laptop"],  # auto may fall back to the cpu-model estimate
        ["--device-profile", "laptop", "--meter", "cpu-model"],
        ["--policy", "gelato", "--v", "5", "--energy-budget-j-per-token", "0.01"],
        ["--policy", "gelato", "--pipeline", "send-ahead", "--ahead-blocks", "3"],
        ["--policy", "lyapunov", "--estimator-halflife-rounds", "5", "--calibrator-halflife-tokens", "100"],
        ["--policy", "gelato", "--calibrator-halflife-tokens", "100"],
        ["--policy", "fixed-4", "--estimator-halflife-rounds", "20"],  # the default, however it was written
        ["--policy", "fixed-4", "--entropy-threshold", "1"],  # the default, however it was written
        ["--policy", "fixed-4", "--k-max", "2", "--pipeline", "local"],
        ["--policy", "fixed-0", "--pipeline", "send-ahead"],  # its empty blocks go ahead
        ["--policy", "heuristic", "--k-max", "6"],
        ["--temperature", "1", "--top-p", "1e-40"],  # a float32 subnormal: still on
        ["--temperature", "1", "--top-p", "0.99999994"],  # float32's largest below 1
        ["--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--top-m", "8", "--seed", "3"],
        ["--top-p", "0"],  # top-p's own "off", greedy or not
        ["--policy", "ar-device", "--temperature", "1", "--top-m", "8"],  # its drafter samples from it
    ],
)
def test_device_accepts_each_policy_its_own_settings(args: list[str]) -> None:
    DeviceConfig.from_args(device_parser().parse_args(["--prompt", "x", *args])).validate()


def test_policy_options_validate_alone() -> None:
    """The simulator and benchmarks build PolicyOptions directly: the same bounds apply."""
    with pytest.raises(ValueError, match="--pipeline must be off, local or send-ahead"):
        PolicyOptions(pipeline="sometimes").validate()
    PolicyOptions(pipeline="send-ahead", ahead_blocks=3, budget_j_per_token=0.5).validate()
    assert PolicyOptions.ahead_blocks == PolicyOptions().ahead_blocks == 2  # class attributes are the defaults


def test_json_log_lines_carry_fields_and_the_traceback() -> None:
    import json
    import logging

    from gelato.cli_common import JsonFormatter

    try:
        raise ValueError("simulated")
    except ValueError:
        import sys

        record = logging.LogRecord("gelato.edge", logging.ERROR, __file__, 1, "x %s", ("y",), sys.exc_info())
    record.fields = {"session": "s1", "rounds": 3, "message": "not over the message"}
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "x y" and out["level"] == "ERROR" and out["logger"] == "gelato.edge"
    assert out["session"] == "s1" and out["rounds"] == 3 and out["ts"].endswith("+00:00")
    assert "ValueError: simulated" in out["exception"]


def test_the_edges_own_listeners_need_their_own_ports() -> None:
    """--metrics-port equal to --port (or, in the image, GELATO_EDGE_METRICS_PORT=50052, its
    health port) failed at the second bind as "port 50051 ... is in use": another process blamed,
    the wrong flag named. Refused up front, naming both; other addresses may share a number."""
    with pytest.raises(ConfigError, match="--port and --metrics-port are both 50051"):
        EdgeConfig(metrics_port=50051).validate()
    with pytest.raises(ConfigError, match="--metrics-port and --health-port are both 50052"):
        EdgeConfig(metrics_port=50052, health_port=50052).validate()
    with pytest.raises(ConfigError, match="--port and --health-port are both 50051"):
        EdgeConfig(host="0.0.0.0", health_port=50051, insecure=True).validate()
    EdgeConfig(metrics_port=9100, health_port=50052).validate()
    EdgeConfig(host="10.0.0.5", metrics_port=50051, insecure=True).validate()  # 10.0.0.5 and 127.0.0.1
    EdgeConfig(host="0.0.0.0", metrics_host="::1", metrics_port=50051, insecure=True).validate()  # IPv4 vs v6
    with pytest.raises(ConfigError, match="--port and --metrics-port are both 50051"):
        EdgeConfig(host="localhost", metrics_port=50051).validate()  # localhost takes 127.0.0.1 too
    with pytest.raises(ConfigError, match="--port and --metrics-port are both 50051"):
        EdgeConfig(host="[::1]", metrics_host="::1", metrics_port=50051).validate()


def test_the_shutdown_grace_period_is_bounded() -> None:
    """--shutdown-grace-s 1e308 was taken: a drain nothing but SIGKILL could end (a second SIGTERM
    does not shorten it). Bounded as every other timeout is."""
    from gelato.config import MAX_TIMEOUT_S

    with pytest.raises(ConfigError, match="--shutdown-grace-s"):
        EdgeConfig(shutdown_grace_s=1e308).validate()
    EdgeConfig(shutdown_grace_s=MAX_TIMEOUT_S).validate()


@pytest.mark.parametrize(
    ("args", "policy"),
    [
        ([], "fixed-4"),  # the plain speculative baseline
        (["--energy-budget-j-per-token", "0.4"], "gelato"),  # SPEC's device command: the budget is kept
        (["--energy-budget-j-per-token", "0.4", "--policy", "fixed-2"], "fixed-2"),  # named: as named
        (["--energy-budget-j-per-token", "0.4", "--v", "5"], "gelato"),  # --v is gelato's to read
        (["--energy-budget-j-per-token", "0.4", "--policy", "auto"], "gelato"),  # auto named
    ],
)
def test_the_default_policy_keeps_a_budget_when_one_is_given(args: list[str], policy: str) -> None:
    config = DeviceConfig.from_args(device_parser().parse_args(["--prompt", "x", *args]))
    config.validate()
    assert config.policy == policy


def test_the_default_policy_is_said_in_help() -> None:
    text = " ".join(device_parser().format_help().split())
    assert "auto: gelato with --energy-budget-j-per-token, else fixed-4 (default: auto)" in text


def test_an_empty_policy_is_refused_not_taken_for_the_default() -> None:
    """`--policy "$POLICY"` with the variable unset: refused, as before the default became `auto`
    (an empty value silently meant the default while it was the empty string)."""
    with pytest.raises(ConfigError, match="unknown policy"):
        DeviceConfig.from_args(device_parser().parse_args(["--prompt", "x", "--policy", ""])).validate()
