"""Typed settings: a program's settings are one dataclass, and its command line is made from it.

Contract: each option is a field declared `name: T = setting(default, "help", ...)`; the default,
the bounds and the help text are written there and nowhere else. From the class:
- `add_arguments(parser, cls)` adds one option per setting: `--name-with-dashes` (or `flag=`), the
  type from the annotation (or `type=`, an argparse type such as `cli_common.port_number`), a
  `bool` as a switch, `choices`, the default appended to the help. With a
  `cli_common.EnvArgumentParser` every option is also an environment variable named from its flag.
- `from_args(cls, namespace)` builds the dataclass from what the parser returned.
- `validate(obj)` raises `ConfigError` with the first broken rule, named by its flag
  (`--max-sessions must be >= 1`): each field's choices and checks in declaration order (a None
  value skips them: "not set"), members of a `one_of` group, then the class's own cross-field
  `check()`.
A field declared `nested(Cls)` holds another settings dataclass whose options are added, built and
validated in place (the device's controller constants, `gelato.device.policy_options.PolicyOptions`, are such a
group of `DeviceConfig`). Fields declared without `setting` are not options. `Settings` is a mixin
that gives a settings dataclass these as methods.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

_SETTING = "gelato.setting"
_NESTED = "gelato.nested"
T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is out of bounds; the text names its flag and the rule (`--port must be ...`)."""


@dataclass(frozen=True)
class Check:
    """One rule a set value must satisfy; `text` completes "<flag> ...", e.g. "must be >= 1"."""

    test: Callable[[Any], bool]
    text: str


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else f"{x:g}"  # 4294967295, not 4.29497e+09


def _finite(x: float) -> bool:
    return isinstance(x, int) or math.isfinite(x)  # an int is (math.isfinite(10**400) overflows)


def ge(low: float, finite: bool = True) -> Check:
    """`value >= low`, and finite unless `finite=False` (argparse's float takes "inf": an infinite
    budget or window would pass and then fail, or wait, far from its flag)."""
    if finite:
        return Check(lambda x: _finite(x) and x >= low, f"must be >= {_num(low)}")
    return Check(lambda x: x >= low, f"must be >= {_num(low)}")


def le(high: float) -> Check:
    return Check(lambda x: x <= high, f"must be <= {_num(high)}")


def gt(low: float, finite: bool = True) -> Check:
    """`value > low`, and finite unless `finite=False`. Every comparison fails for NaN."""
    if finite:
        return Check(lambda x: _finite(x) and x > low, f"must be > {_num(low)}")
    return Check(lambda x: x > low, f"must be > {_num(low)}")


def between(low: float, high: float) -> Check:
    """The open interval (low, high)."""
    return Check(lambda x: low < x < high, f"must be in ({_num(low)}, {_num(high)})")


PORT = Check(lambda p: 0 <= p <= 65535, "must be in 0-65535")
# A model path given empty ("--target \"$TARGET\"" with TARGET unset) would load the built-in tiny
# model without a word; left out, it is the default on purpose.
MODEL_PATH = Check(
    lambda x: bool(str(x).strip()), "must name a hub id or a folder (leave it out for the built-in model)"
)
# A credential or file path given empty ("--tls-ca \"$CA\"" with CA unset) would read as not given:
# TLS or the token silently off. Left out, it is off on purpose.
FILE_PATH = Check(lambda x: bool(str(x).strip()), "must name a file (leave it out for none)")
HOST_NAME = Check(lambda x: bool(str(x).strip()), "must name a host (leave it out for --edge's own)")
# Settings that travel in a uint32 field (SessionOpened, InfoResponse): a larger one would pass at
# start and then fail every open or Info when encoded.
UINT32 = Check(lambda x: x <= 2**32 - 1, "must be <= 4294967295 (it travels as a uint32)")
# gRPC ends a call at once as DEADLINE_EXCEEDED when its timeout is far out (1e20 s did, 1e9 s did
# not): settings used as call timeouts are bounded by this, refused at start instead of failing
# every call.
MAX_TIMEOUT_S = 10**7


@dataclass(frozen=True)
class Setting:
    """What `setting(...)` records in a field's metadata."""

    help: str
    flag: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    checks: tuple[Check, ...] = ()
    one_of: str | None = None
    required: bool = False
    action: str | None = None


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    check: Check | Sequence[Check] = (),
    one_of: str | None = None,
    required: bool = False,
    action: str | None = None,
) -> Any:
    """A dataclass field that is one command-line option (module docstring). `one_of`: a
    mutually exclusive group's name (`required`: one member must be given); `action="append"`: a
    repeatable option collected in a list (default None)."""
    checks = (check,) if isinstance(check, Check) else tuple(check)
    options = tuple(choices) if choices is not None else None
    meta = Setting(help, flag, type, options, metavar, checks, one_of, required, action)
    return field(default=default, metadata={_SETTING: meta})


def nested(cls: type[T]) -> Any:
    """A field holding the settings dataclass `cls` (its defaults), whose options join the parent's."""
    return field(default_factory=cls, metadata={_NESTED: True})


def flag_of(f: Field[Any]) -> str:
    meta: Setting = f.metadata[_SETTING]
    return meta.flag or "--" + f.name.replace("_", "-")


def _settings(cls: type) -> list[tuple[Field[Any], Setting | None]]:
    """(field, its Setting) per option of `cls`, nested groups as (field, None), in order."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    out: list[tuple[Field[Any], Setting | None]] = []
    for f in fields(cls):
        if _NESTED in f.metadata:
            out.append((f, None))
        elif _SETTING in f.metadata:
            out.append((f, f.metadata[_SETTING]))
    return out


def _value_type(annotation: Any) -> Any:
    """`int | None` -> int, `list[str] | None` -> list[str]; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _help(meta: Setting, default: Any) -> str:
    text = meta.help
    if default is not None and not isinstance(default, bool):
        shown = _num(default) if isinstance(default, float) else str(default)
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")  # argparse formats help with %


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per setting of `cls` (nested groups included), in declaration order."""
    groups: dict[str, Any] = {}
    seen: set[str] = {a.dest for a in parser._actions}
    _add(parser, cls, groups, seen)


def _add(parser: argparse.ArgumentParser, cls: type, groups: dict[str, Any], seen: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    required = {m.one_of for _, m in _settings(cls) if m is not None and m.one_of and m.required}
    for f, meta in _settings(cls):
        if meta is None:
            _add(parser, _value_type(hints[f.name]), groups, seen)
            continue
        if f.name in seen:
            raise ValueError(f"{cls.__name__}.{f.name}: another option already uses this name")
        seen.add(f.name)
        kind = _value_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": _help(meta, f.default)}
        if kind is bool:
            if f.default is not False:
                raise ValueError(f"{cls.__name__}.{f.name}: a switch defaults to False")
            kwargs["action"] = "store_true"
        else:
            if meta.action:
                kwargs["action"] = meta.action
                kind = _value_type(typing.get_args(kind)[0]) if typing.get_args(kind) else str
            convert = meta.type or (kind if kind in (int, float, str, Path) else None)
            if convert is None:
                raise ValueError(f"{cls.__name__}.{f.name}: give type= for a {kind!r} option")
            if convert is not str:
                kwargs["type"] = convert
            if meta.choices is not None:
                kwargs["choices"] = list(meta.choices)
            if meta.metavar:
                kwargs["metavar"] = meta.metavar
            elif meta.flag and meta.choices is None:  # named after the flag, as argparse names it
                kwargs["metavar"] = meta.flag.lstrip("-").upper().replace("-", "_")
        target: Any = parser
        if meta.one_of:
            if meta.one_of not in groups:
                groups[meta.one_of] = parser.add_mutually_exclusive_group(required=meta.one_of in required)
            target = groups[meta.one_of]
        target.add_argument(flag_of(f), **kwargs)


def from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    """The settings dataclass `cls` from a namespace `add_arguments(parser, cls)` produced."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f, meta in _settings(cls):
        if meta is None:
            values[f.name] = from_args(_value_type(hints[f.name]), namespace)
        elif hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
    return cls(**values)


def _words(choices: Sequence[Any]) -> str:
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def validate(obj: Any) -> None:
    """Raise `ConfigError` for the first rule `obj` breaks (module docstring); None when it keeps all."""
    members: dict[str, list[tuple[str, bool, bool]]] = {}
    for f, meta in _settings(type(obj)):
        value = getattr(obj, f.name)
        if meta is None:
            validate(value)
            continue
        flag = flag_of(f)
        if meta.one_of:
            members.setdefault(meta.one_of, []).append((flag, value is not None, meta.required))
        if value is None:
            continue
        if meta.choices is not None and value not in meta.choices:
            raise ConfigError(f"{flag} must be {_words(meta.choices)}")
        for rule in meta.checks:
            if not rule.test(value):
                raise ConfigError(f"{flag} {rule.text}, got {value!r}")
    for group in members.values():
        given = [flag for flag, is_set, _ in group if is_set]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} exclude each other")
        if not given and any(req for *_, req in group):
            raise ConfigError(f"one of {_words([flag for flag, *_ in group])} is required")
    check = getattr(obj, "check", None)
    if callable(check):
        check()


def require(holds: bool, message: str) -> None:
    """For `check()`: raise `ConfigError(message)` unless `holds`."""
    if not holds:
        raise ConfigError(message)


class Settings:
    """Mixin for a settings dataclass: `add_arguments`, `from_args` and `validate` as methods, and
    `check()`, the cross-field rules (none by default; raise `ConfigError`, e.g. via `require`)."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser, cls)

    @classmethod
    def from_args(cls: type[T], namespace: argparse.Namespace) -> T:
        return from_args(cls, namespace)

    def validate(self) -> None:
        validate(self)

    def check(self) -> None:
        """Rules between fields, after every field's own (override)."""
