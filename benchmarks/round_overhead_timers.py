"""Timers for the round-overhead benchmark (`gelato.benchmarks.round_overhead`): durations of named calls
of the real code, summed per unit (a device round or an edge verdict).

Contract: `Recorder` holds the units (`open(t0, **tags)` starts one, `close()` ends it with its
`total`; `add(name, s)` and `mark(key, t, first)` record into the open unit only); `timed(rec,
name, fn, marks)` wraps a sync or async `fn` so that each call adds its duration to `rec`;
`Patches` replaces attributes of modules, classes or objects with such wrappers and puts them back
on `restore()` (a missing attribute is recorded in `missing`, not raised); `wrapper_cost_us()` is
what one timed call adds, in µs.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any


class Recorder:
    """Durations of named calls, summed per unit (a device round or an edge verdict). A unit is
    opened and closed by hooks on the real code; calls outside any unit are not recorded."""

    def __init__(self) -> None:
        self.units: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None

    def add(self, name: str, seconds: float) -> None:
        unit = self.current
        if unit is not None:
            unit[name] = unit.get(name, 0.0) + seconds
            unit["calls"] = unit.get("calls", 0) + 1

    def mark(self, key: str, t: float, first: bool) -> None:
        """An absolute time (`perf_counter`: CLOCK_MONOTONIC, comparable across processes) in the
        unit: the first or the last one given under `key`."""
        unit = self.current
        if unit is not None and (not first or key not in unit):
            unit[key] = t

    def open(self, t0: float, **tags: Any) -> None:
        self.current = {"at_start": t0, **tags}

    def close(self) -> None:
        unit, self.current = self.current, None
        if unit is not None:
            unit["at_end"] = time.perf_counter()
            unit["total"] = unit["at_end"] - unit["at_start"]
            self.units.append(unit)


def timed(
    rec: Recorder, name: str | Callable[[], str], fn: Callable[..., Any], marks: tuple[str, str] | None = None
) -> Callable[..., Any]:
    """`fn` (sync or async) adding its duration to `rec` under `name` (or `name()` at call time).
    An async `fn` with `marks` also records the unit's first start and last end of it."""
    label: Callable[[], str] = name if callable(name) else (lambda: name)  # type: ignore[assignment,return-value]

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                rec.add(label(), t1 - t0)
                if marks:
                    rec.mark(marks[0], t0, first=True)
                    rec.mark(marks[1], t1, first=False)

        return timed_async

    @functools.wraps(fn)
    def timed_sync(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            rec.add(label(), time.perf_counter() - t0)

    return timed_sync


class Patches:
    """Attributes replaced on modules, classes or objects, put back by `restore`. A missing
    attribute (the real code was renamed) is recorded in `missing` instead of failing."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, bool, Any]] = []
        self.missing: list[str] = []

    def replace(self, owner: Any, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        where = f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
        try:
            raw = inspect.getattr_static(owner, attr)
        except AttributeError:
            self.missing.append(where)
            return
        own = attr in vars(owner)
        if isinstance(raw, staticmethod):
            new: Any = staticmethod(make(raw.__func__))
        elif inspect.isclass(owner) or inspect.ismodule(owner):
            new = make(raw)
        else:
            new = make(getattr(owner, attr))  # an instance: wrap the bound method
        self._undo.append((owner, attr, own, raw))
        setattr(owner, attr, new)

    def time(
        self, owner: Any, attr: str, rec: Recorder, name: str | Callable[[], str], marks: tuple[str, str] | None = None
    ) -> None:
        self.replace(owner, attr, lambda fn: timed(rec, name, fn, marks))

    def restore(self) -> None:
        for owner, attr, own, raw in reversed(self._undo):
            if own:
                setattr(owner, attr, raw)
            else:
                delattr(owner, attr)
        self._undo.clear()


def wrapper_cost_us(n: int = 20000) -> float:
    """What one timed call adds (µs): a timed no-op minus a plain one."""
    rec = Recorder()
    rec.open(time.perf_counter())

    def noop() -> None:
        return None

    wrapped = timed(rec, "noop", noop)
    best = []
    for f in (noop, wrapped) * 3:
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best.append((time.perf_counter() - t0) / n)
    return max(0.0, min(best[1::2]) - min(best[0::2])) * 1e6
