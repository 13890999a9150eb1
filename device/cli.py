"""`gelato-device`: generate with a local drafter and a remote GELATO edge.

Contract (extend, don't break): `gelato-device [--drafter MODEL] [--edge HOST:PORT] (--prompt TEXT |
--prompts-file FILE) [options]` (no --drafter: the built-in one; no --edge: 127.0.0.1:50051); every
option, its default and its `GELATO_DEVICE_*` variable: `gelato-device --help`, made from
`gelato.device.config.DeviceConfig` (the policy and controller constants included). With --json,
one JSON object per prompt on stdout (README "CLI" lists the fields); energy is null, never 0, when
the meter cannot read. A prompt that fails (the edge refuses it, or the session breaks
mid-generation) gets its own line with `error` and `stop_reason: "error"` — with the tokens
generated until then — and the run goes on (`--fail-fast`: stop there); an unreachable edge ends
the run (that prompt's line, the first one's when the edge cannot be reached at all, says so).
A settings error that names a flag set by its `GELATO_DEVICE_*` variable names the variable too. Exit status 0 when
every prompt succeeded, 1 when any failed or the edge cannot be reached, 2 on bad arguments (a bad
TLS or token file included, and a token that would go in plaintext to a non-loopback --edge: that
needs TLS, `--tls` or `--tls-ca`, or `--insecure`). The run itself is `gelato.device.run`, imported
once the settings are valid: `--help` and settings errors answer without loading torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gelato.cli_common import EnvArgumentParser, fail, say, setup_logging, setup_torch_threads
from gelato.device.config import DeviceConfig
from gelato.device.energy import EnergyAccountant
from gelato.device.policy import Lyapunov, parse_policy
from gelato.power import HOST_WIDE, MeterUnavailable, RadioProfile, open_meter, radio_profile
from gelato.security import (
    SecurityConfigError,
    channel_credentials,
    check_token_transport,
    read_token,
    target_is_loopback,
)

if TYPE_CHECKING:  # gRPC loads after `setup_logging`, which may set GRPC_VERBOSITY for it
    import grpc


def build_parser() -> EnvArgumentParser:
    """Every `DeviceConfig` setting as an option and a `GELATO_DEVICE_*` variable."""
    p = EnvArgumentParser(
        prog="gelato-device", description="GELATO device: draft locally, verify on the edge", env_prefix="GELATO_DEVICE"
    )
    DeviceConfig.add_arguments(p)
    return p


def read_prompts(config: DeviceConfig) -> list[str]:
    """The prompts (`--prompt`, or `--prompts-file` JSONL up to `--limit`), each valid Unicode: a
    ValueError names the flag, and the file and line, of anything else (a tokenizer fails on it)."""
    if config.prompt:
        for n, given in enumerate(config.prompt, 1):
            _check_text(given, f"--prompt (the {_ordinal(n)})")
        return list(config.prompt)
    prompts: list[str] = []
    if config.prompts_file is None:
        return prompts
    path = config.prompts_file
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"--prompts-file {path}: {exc.strerror or exc}") from None
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompts-file {path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        text = rec.get("prompt", rec.get("question")) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: needs a string 'prompt' or 'question'")
        _check_text(text, f"--prompts-file {path}:{n}")
        prompts.append(text)
    return prompts[: config.limit] if config.limit is not None else prompts


def _check_text(text: str, where: str) -> None:
    """Text a tokenizer can take: no lone surrogate (Python's stand-in for bytes of a command-line
    argument that are not UTF-8, or a JSON escape such as \\udce9)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: not valid Unicode text at character {exc.start + 1} (not UTF-8?)") from None


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def transport_security(config: DeviceConfig) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """TLS credentials (`config.uses_tls`: --tls, a CA, a client certificate or a server name; no
    --tls-ca means gRPC's default roots) and the bearer token, read and checked now so that a bad
    file costs no model load. A token never goes in plaintext to an --edge naming any non-loopback
    host unless --insecure (SecurityConfigError, as every bad file)."""
    credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key) if config.uses_tls else None
    token = read_token(config.auth_token_file) if config.auth_token_file else None
    check_token_transport(config.edge, credentials is not None, token, config.insecure)
    return credentials, token


def trace_problem(path: str | Path | None) -> str:
    """Why `--trace PATH` could not be written ('' when it can), checked without creating it."""
    if not path:
        return ""
    target = Path(path)
    folder = target.parent  # "." for a bare file name
    if target.is_dir():
        return f"{path} is a folder"
    if not folder.is_dir():
        return f"no such folder: {folder}"
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"{path} is not writable"
    return ""


def _radio(config: DeviceConfig) -> RadioProfile | None:
    return radio_profile(config.radio, config.radio_up_mbit, config.radio_down_mbit)


def open_accountant(config: DeviceConfig) -> EnergyAccountant:
    if config.meter == "none":  # no meter to warn about
        return EnergyAccountant(open_meter("none"), _radio(config))
    # The drafter's device: NVML reads the GPU it runs on, and `auto` skips NVML for a CPU drafter.
    meter = open_meter(config.meter, config.device_profile, config.device)
    shares_host = config.edge and target_is_loopback(config.edge)
    if meter.source in HOST_WIDE and shares_host and config.policy != "ar-device":  # ar-device: no edge
        say(
            f"gelato-device: warning: the {meter.source} meter reads {HOST_WIDE[meter.source]}, which the edge at "
            f"{config.edge} shares: its energy counts as the device's (--meter cpu-model meters this process alone)"
        )
    return EnergyAccountant(meter, _radio(config))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, to end it as Ctrl-C does."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """`_main`, with the ways a user ends a run that are not errors of the run: Ctrl-C (exit 130,
    one line, the session closed as on any cancellation), SIGTERM the same way (exit 143: `docker
    stop`; as a container's PID 1 the default action would be none, and the stop would wait for
    its SIGKILL) and a reader of stdout that went away (`gelato-device --json | head -1`: exit 141,
    as a shell's SIGPIPE, silently)."""
    previous = signal.signal(signal.SIGTERM, _terminate) if _in_main_thread() else None
    try:
        return _main(argv)
    except Terminated:
        say("gelato-device: terminated", logging.ERROR)
        return 143
    except KeyboardInterrupt:
        say("gelato-device: interrupted", logging.ERROR)
        return 130
    except BrokenPipeError:
        # Python would report the failed flush of stdout again at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:  # called in-process (tests): the caller's handler again
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = DeviceConfig.from_args(parser.parse_args(argv))
    if "--prompts-file" in parser.silenced and "--limit" in parser.from_env:
        # A deployment's GELATO_DEVICE_LIMIT goes with its GELATO_DEVICE_PROMPTS_FILE, which a
        # --prompt on the command line silenced: the limit goes with it (a typed --limit is refused).
        config = replace(config, limit=None)
    # Before anything logs: which meter `auto` took and why no other reads, failovers, fallbacks.
    setup_logging(config.log_level, config.log_format)
    try:
        config.validate()
        prompts = read_prompts(config)
        credentials, token = transport_security(config)
    except (OSError, ValueError, SecurityConfigError) as exc:
        return fail(parser.explain(str(exc)))
    if not prompts:
        return fail("no prompts given")
    if token and credentials is None and not target_is_loopback(config.edge):
        # Allowed only by --insecure: said at every run, naming the variable if it came from one
        # (a GELATO_DEVICE_INSECURE left exported would otherwise pass unnoticed), as the edge does.
        why = parser.explain("--insecure")
        say(
            f"gelato-device: warning: sending the bearer token in plaintext to {config.edge} ({why}): anyone "
            "on the path can read it"
        )
    policy = parse_policy(config.policy, config.controller)
    if config.controller.budget_j_per_token is not None and not isinstance(policy, Lyapunov):  # gelato is one too
        # Accepted (the queue against it is recorded, for comparison), but said: the run will not
        # keep the budget unless its policy decides by it.
        say(
            f"gelato-device: warning: --policy {policy.name} does not steer by --energy-budget-j-per-token "
            "(only lyapunov and gelato do): the run only records its deficit queue against it"
        )
    bad_trace = trace_problem(config.trace)
    if bad_trace:  # before the model loads: a typo should not cost a load (minutes for a real one)
        return fail(parser.explain(f"--trace: {bad_trace}"))
    try:
        acct = open_accountant(config)
    except (MeterUnavailable, ValueError) as exc:
        return fail(parser.explain(f"--meter {config.meter}: {exc}"))
    running = False
    try:
        # Only now torch and transformers: --help and a settings error answer without them.
        from gelato.device.drafter import check_drafter
        from gelato.device.run import run
        from gelato.models import ModelLoadError, load_failure, load_model

        setup_torch_threads(config.threads)
        try:
            loaded = load_model(config.drafter, "drafter", config.dtype, config.device)
            check_drafter(loaded)
        except ModelLoadError as exc:  # about the drafter unless it names another setting (--device)
            return fail(parser.explain(str(exc), also=("--drafter",) if "drafter" in str(exc) else ()))
        except Exception as exc:  # not foreseen (a bug, a failure below transformers): one line all the same
            return fail(load_failure("drafter", config.drafter, exc))
        try:  # opened before any generation, so a bad path costs nothing
            trace = open(config.trace, "w", encoding="utf-8") if config.trace else None  # noqa: SIM115
        except OSError as exc:
            return fail(parser.explain(f"--trace: {exc}"))
        running = True  # `run` closes the meter when it ends
        return asyncio.run(run(config, credentials, token, prompts, loaded, acct, trace))
    finally:
        if not running:  # a meter holds a sampler thread, NVML's init or RAPL's files
            acct.meter.close()


if __name__ == "__main__":
    raise SystemExit(main())
