"""Command-line pieces shared by `gelato-edge` and `gelato-device`.

Contract: the settings themselves are typed dataclasses (`gelato.edge.config.EdgeConfig`,
`gelato.device.config.DeviceConfig`, made into options by `gelato.config`); `model_dtype`,
`model_device` and `torch_threads` are the model settings both declare, `log_level` and
`log_format` their logging (`setup_logging`: text lines, or JSON ones by `JsonFormatter`). `setup_torch_threads`
applies `--threads` (one thread per process is the fastest on small CPUs); `fail` prints
a one-line `error:` message and returns the CLI's exit status. `port_number` and `endpoint` are
argparse types: a bad value is a usage error (exit 2) naming the flag, never a traceback or, as
gRPC does with a port above 65535, a silently different port; `positive_int` a count >= 1;
`max_memory` parses `--max-memory`.

`EnvArgumentParser(prog, env_prefix=...)` is an `ArgumentParser` whose every option can also be set
by an environment variable named from the prefix and the long flag (`--port` of `GELATO_EDGE` is
`GELATO_EDGE_PORT`, `--kv-budget-mb` is `GELATO_EDGE_KV_BUDGET_MB`), for containers. A flag given
on the command line wins over its variable (for a mutually exclusive group: any member given on the
command line silences the group's variables). A variable's value goes through the flag's own type
and choices; a bad one is a usage error naming the variable; an empty variable counts as unset (so
compose files can pass `${VAR:-}` through; a blank one too). Switches (`store_true`) take 1/0, true/false, yes/no,
on/off; a repeatable flag (`append`) takes one value.
`--help` names each option's variable. After a parse, `from_env` holds the options it took from
variables, `silenced` those whose variable a rival on the command line silenced, and
`explain(message)` adds to a settings error (`--port must be ...`) the variable behind each flag it
names.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from gelato.config import ge, le, setting

DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_dtype() -> Any:
    """The `--dtype` setting (a fresh field for each settings class)."""
    return setting(
        "auto",
        "weight dtype (auto: bfloat16 on a GPU that computes it natively, else float16; float32 on CPU)",
        choices=DTYPES,
    )


def model_device() -> Any:
    return setting("auto", "auto, cpu or cuda[:N]")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LOG_FORMATS = ("text", "json")


def log_level() -> Any:
    """The `--log-level` setting: the threshold of the process's log lines on stderr."""
    return setting("WARNING", "logging threshold", type=str.upper, choices=LOG_LEVELS)


def log_format() -> Any:
    """The `--log-format` setting: text lines, or one JSON object per line for a log collector."""
    return setting("text", "log lines as text, or one JSON object per line (json)", type=str.lower, choices=LOG_FORMATS)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `ts` (UTC, ISO 8601), `level`, `logger`, `message`, the
    record's `fields` (a dict passed as `extra={"fields": ...}`: e.g. a session's id and sizes)
    and `exception` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update((k, v) for k, v in fields.items() if k not in out)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_JSON_LOGS = False  # set by `setup_logging`: stderr's lines are JSON records


def say(message: str, level: int = logging.WARNING) -> None:
    """A status line for stderr, shown whatever `--log-level` is: as it is, or under `--log-format
    json` as a JSON record of `level` (logger `gelato.cli`), so that a collector reading stderr
    gets JSON lines only."""
    if _JSON_LOGS:
        record = logging.getLogger("gelato.cli").makeRecord("gelato.cli", level, "", 0, message, (), None)
        message = JsonFormatter().format(record)
    print(message, file=sys.stderr, flush=True)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log lines on stderr at `level`, as text (`LOG_FORMAT`) or JSON (`JsonFormatter`). With JSON,
    gRPC's C core logs errors only (unless `GRPC_VERBOSITY` says otherwise): its own lines are not
    JSON, and at its default it writes one for every failed TLS handshake, so anyone reaching the
    port could break a collector's parsing with a plaintext connect."""
    global _JSON_LOGS
    _JSON_LOGS = fmt == "json"
    if _JSON_LOGS:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


MAX_THREADS = 4096


def torch_threads() -> Any:
    # At most MAX_THREADS: torch takes a C int (a larger value wraps and fails deep inside it),
    # and more threads than any machine has cores only oversubscribes.
    return setting(None, "torch CPU threads (default: torch's own)", type=int, check=(ge(1), le(MAX_THREADS)))


def port_number(text: str) -> int:
    # ASCII digits only (around them blanks, as int() takes: a CRLF env file's "50051\r"): int()
    # also takes "5_0051", "+1" and other scripts' digits, which gRPC's address parser refuses.
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    port = int(digits)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0-65535, got {port}")
    return port


GRPC_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (a count where 0 would do nothing, or fail later: `--heldout`
    0 trained on nothing, a load benchmark's `--waves 0` failed after starting its edge)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def endpoint(text: str) -> str:
    """HOST:PORT (IPv6 as [ADDR]:PORT) with a port in 1-65535, or a gRPC target URI naming several
    replicas (`dns:///edge:50051`, `ipv4:10.0.0.1:50051,10.0.0.2:50051`); returned unchanged. A
    target URI is checked here in full (`_grpc_target`): gRPC core takes a malformed one without an
    error, logs it, and its channel then never connects nor lets the process exit."""
    if text.startswith(GRPC_TARGET_SCHEMES):
        _grpc_target(text)
        return text
    if "://" in text:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or a gRPC target (dns:///HOST:PORT), got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not host or host in ("[]",):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"write an IPv6 address as [ADDR]:PORT, got {text!r}")
    if port != port.strip():  # goes to gRPC as written, which refuses it (the device then waited in vain)
        raise argparse.ArgumentTypeError(f"not a port number: {port!r}")
    if port_number(port) == 0:
        raise argparse.ArgumentTypeError(f"port must be in 1-65535, got 0 in {text!r}")
    return text


def _grpc_target(text: str) -> None:
    """`ipv4:`/`ipv6:` a comma list of ADDR:PORT (IPv6 as [ADDR]:PORT), `dns:` [//AUTHORITY/]HOST:PORT
    (gRPC would dial 443 without a port: asked for explicitly), `unix:` a path."""
    scheme, rest = text.split(":", 1)
    if not rest.strip("/"):
        raise argparse.ArgumentTypeError(f"a gRPC target needs addresses after the scheme, got {text!r}")
    if scheme == "unix":
        return
    if scheme == "dns":
        name = rest[2:].split("/", 1)[1] if rest.startswith("//") and "/" in rest[2:] else rest
        _address(name, text, ip=None)
        return
    for address in rest.split(","):
        _address(address, text, ip=4 if scheme == "ipv4" else 6)


def _address(address: str, text: str, ip: int | None) -> None:
    """One HOST:PORT of a gRPC target; `ip` 4 or 6: the host must be such an address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        what = f"{address!r} in {text!r}"
        raise argparse.ArgumentTypeError(f"each address of a gRPC target needs :PORT (1-65535): {what}")
    if ip is None:
        return
    bare = host[1:-1] if ip == 6 and host.startswith("[") and host.endswith("]") else host
    try:
        if ipaddress.ip_address(bare).version != ip:
            raise ValueError
    except ValueError:
        form = "[ADDR]:PORT" if ip == 6 else "ADDR:PORT"
        raise argparse.ArgumentTypeError(f"not an IPv{ip} {form}: {address!r} in {text!r}") from None


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def byte_size(text: str) -> int:
    """`20GiB`, `500MB`, `1.5GB`, `4096` (bytes) -> bytes; the units accelerate understands."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 20GiB, 500MB, 4096)")
    amount = float(m.group(1)) * SIZE_UNITS[unit]
    if not math.isfinite(amount):  # a number of hundreds of digits: int() of it overflowed
        raise ValueError(f"not a size: {text!r} (too large)")
    size = int(amount)
    if size <= 0:
        raise ValueError(f"a size must be > 0, got {text!r}")
    return size


def max_memory(text: str) -> dict[int | str, int]:
    """`0=20GiB,1=20GiB,cpu=64GiB` -> {0: bytes, 1: bytes, "cpu": bytes}: the most each device may
    hold of a model placed by accelerate (`--device-map`). GPUs by index (or cuda:N), `cpu`, `mps`."""
    limits: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE[,DEVICE=SIZE...], got {part.strip()!r}")
        dev: int | str
        if key.removeprefix("cuda:").isdigit():
            dev = int(key.removeprefix("cuda:"))
        elif key in ("cpu", "mps"):
            dev = key
        else:
            raise argparse.ArgumentTypeError(f"unknown device {key!r}: use a GPU index (0, 1, ...), cpu or mps")
        if dev in limits:
            raise argparse.ArgumentTypeError(f"device {key!r} is given twice")
        try:
            limits[dev] = byte_size(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{key}: {exc}") from None
    return limits


def _names(message: str, flag: str) -> bool:
    """Whether `message` names `flag` as a whole word (`--limit`, not `--limit-x`)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message) is not None


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()
# Kubernetes gives every pod, for each Service, docker-link variables named after it: a Service
# called `gelato-edge` sets GELATO_EDGE_PORT=tcp://10.96.0.7:50051 (and _SERVICE_HOST, ...), a
# service link that is no port setting. Skipped with a warning, not a failed start.
_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://")


def _asks_json(args: Sequence[str], env_value: str | None) -> bool:
    """Whether a command line (or else its `*_LOG_FORMAT` variable) asks for `--log-format json`:
    as argparse reads it, the last one given, abbreviated down to `--log-f` (`--log-` is ambiguous)."""
    asked = env_value
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if len(name) >= len("--log-f") and "--log-format".startswith(name):
            asked = value if eq else (args[i + 1] if i + 1 < len(args) else asked)
    return (asked or "").strip().lower() == "json"


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose options can also come from `<env_prefix>_<FLAG>` variables (module
    docstring). `env_skip`: dests that are actions rather than settings (e.g. a one-shot mode) and
    so have no variable."""

    def __init__(self, *args: Any, env_prefix: str, env_skip: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env_prefix = env_prefix.rstrip("_")
        self.env_skip = set(env_skip)
        # Flag -> "NAME='raw'" for each option the last parse took from its variable, and for each
        # whose variable was set but silenced by a rival of its group given on the command line.
        self.from_env: dict[str, str] = {}
        self.silenced: dict[str, str] = {}
        self._json = False  # the run asks for JSON logs (`_asks_json`): its parse's own lines are JSON too

    def _say(self, message: str, level: int) -> None:
        """A line of the parse (before `setup_logging`), as a JSON record when the run asks for JSON."""
        if self._json:
            record = logging.getLogger("gelato.cli").makeRecord("gelato.cli", level, "", 0, message, (), None)
            message = JsonFormatter().format(record)
        print(message, file=sys.stderr, flush=True)

    def error(self, message: str) -> NoReturn:
        """A usage error: argparse's usage and message, or under `--log-format json` one record."""
        if not self._json:
            super().error(message)
        self._say(f"{self.prog}: error: {message}", logging.ERROR)
        raise SystemExit(2)

    def env_name(self, action: argparse.Action) -> str | None:
        """The variable that sets `action`, or None (positionals, --help, skipped dests)."""
        longs = [o for o in action.option_strings if o.startswith("--")]
        if (
            not longs
            or action.dest in self.env_skip
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return None
        return f"{self.env_prefix}_{longs[0][2:].upper().replace('-', '_')}"

    def env_names(self) -> dict[str, str]:
        """Flag -> variable, for every option that has one."""
        return {a.option_strings[-1]: n for a in self._actions if (n := self.env_name(a))}

    def format_help(self) -> str:
        names = self.env_names()
        if self.epilog is None and names:
            flag, name = next(iter(names.items()))
            self.epilog = (
                f"Every option marked [env: {self.env_prefix}_<OPTION>] can also be set by that "
                f"environment variable ({flag}: {name}); an option given on the command line wins."
            )
        for action in self._actions:
            var = self.env_name(action)
            if var and not getattr(action, "_env_noted", False):
                note = f"[env: {var}]"
                action.help = f"{action.help} {note}" if action.help else note
                action._env_noted = True  # type: ignore[attr-defined]
        return super().format_help()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # An empty or blank variable is unset (compose passes `${VAR:-}` through; env files template).
        env = {
            a: (n, os.environ[n]) for a in self._actions if (n := self.env_name(a)) and os.environ.get(n, "").strip()
        }
        self._json = _asks_json(
            sys.argv[1:] if args is None else list(args), os.environ.get(f"{self.env_prefix}_LOG_FORMAT")
        )
        for a, (name, raw) in list(env.items()):
            if a.type is port_number and _SERVICE_LINK.match(raw):
                del env[a]
                self._say(
                    f"{self.prog}: warning: ignoring {name}={raw!r}: a Kubernetes service link (a Service named "
                    f"like this program), not a port; set {a.option_strings[-1]}, or enableServiceLinks: false",
                    logging.WARNING,
                )
        self.from_env, self.silenced = {}, {}
        if not env:
            return super().parse_known_args(args, namespace)
        groups = [g for g in self._mutually_exclusive_groups if any(a in env for a in g._group_actions)]
        saved = [(a, a.default, a.required) for a in env]
        saved_groups = [(g, g.required) for g in groups]
        for a in env:  # parse with a marker, to tell "not on the command line" from "given = default"
            a.default = None if isinstance(a, (argparse._AppendAction, argparse._ExtendAction)) else _UNSET
            a.required = False
        for g in groups:
            g.required = False
        try:
            ns, extras = super().parse_known_args(args, namespace)
        finally:
            for a, default, required in saved:
                a.default, a.required = default, required
            for g, required in saved_groups:
                g.required = required
        given = {a for a in self._actions if a not in env or getattr(ns, a.dest, _UNSET) not in (_UNSET, None)}
        from_env: dict[argparse.Action, str] = {}
        for a, (name, raw) in env.items():
            if a in given:  # the command line wins
                continue
            rivals = [g for g in groups if a in g._group_actions]
            if any(b in given and b is not a and self._was_given(ns, b) for g in rivals for b in g._group_actions):
                setattr(ns, a.dest, a.default)  # a rival of its group is on the command line
                self.silenced[a.option_strings[-1]] = f"{name}={raw!r}"
                continue
            for g in rivals:
                for b, other in from_env.items():
                    if b in g._group_actions:
                        self.error(f"environment variables {other} and {name} are mutually exclusive")
            setattr(ns, a.dest, self._env_value(a, name, raw))
            from_env[a] = name
            self.from_env[a.option_strings[-1]] = f"{name}={raw!r}"
        for a in env:  # what was neither given nor set gets its real default back
            if getattr(ns, a.dest, None) is _UNSET:
                setattr(ns, a.dest, a.default)
        return ns, extras

    def explain(self, message: str, also: Iterable[str] = ()) -> str:
        """`message` (a settings error naming flags, `--limit must be >= 0`) with the variable
        behind each flag it names that the last parse took from the environment, so that a user
        who never typed the flag sees where the value came from. A message naming its field first,
        as a value's own check does (`top_p must be in [0, 1], got nan`), names that field's flag;
        `also`: flags the message is about without naming them (`cannot load drafter 'x'`)."""
        named = [
            f"{flag} came from {var}"
            for flag, var in self.from_env.items()
            if _names(message, flag) or message.startswith(flag[2:].replace("-", "_") + " ") or flag in also
        ]
        return f"{message} ({'; '.join(named)})" if named else message

    def _was_given(self, ns: argparse.Namespace, action: argparse.Action) -> bool:
        value = getattr(ns, action.dest, None)
        return value is not None and value is not _UNSET and value != action.default

    def _env_value(self, action: argparse.Action, name: str, raw: str) -> Any:
        def bad(why: str) -> NoReturn:
            self.error(f"environment variable {name}={raw!r}: {why}")

        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            word = raw.strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                bad("expected 1/0, true/false, yes/no or on/off")
            return action.const if word in TRUE_WORDS else action.default
        if isinstance(action, argparse._StoreConstAction):
            bad("this option takes no value; set it on the command line")
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        items = shlex.split(raw) if many else [raw]
        values = [self._convert(action, item, bad) for item in items]
        if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
            return values
        return values if many else values[0]

    def _convert(self, action: argparse.Action, text: str, bad: Callable[[str], NoReturn]) -> Any:
        convert = action.type if callable(action.type) else str
        try:
            value = convert(text)
        except argparse.ArgumentTypeError as exc:
            bad(str(exc))
        except (TypeError, ValueError) as exc:
            what = getattr(convert, "__name__", repr(convert))
            bad(f"invalid {what} value" + (f" ({exc})" if str(exc) and what not in ("int", "float") else ""))
        if action.choices is not None and value not in action.choices:
            bad(f"invalid choice: {value!r} (choose from {', '.join(map(repr, action.choices))})")
        return value


def setup_torch_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise SystemExit(fail("--threads must be >= 1"))
        torch.set_num_threads(threads)


def fail(message: str, code: int = 2) -> int:
    say(f"error: {message}", logging.ERROR)
    return code
