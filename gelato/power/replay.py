"""Replay a recorded power trace as a meter (tests, simulation).

Contract: `ReplayMeter(path)` reads a trace of `(t_s, power_w)` samples — CSV with a header
`t_s,power_w` or JSONL objects with those keys — and reports the energy of the piecewise-linear
power curve from the trace's start to (now − meter start), holding the last power past the end.
The trace says what it is: an optional `kind` column (CSV) or key (JSONL), `measured` (a recording
of a real meter) or `estimated` (a synthetic or modelled trace), the same on every sample; a trace
that does not say is labelled `estimated` (unknown provenance is no measurement), and a mixed or
unknown value is refused with `MeterUnavailable` naming the file. An explicit `kind=` given to
`ReplayMeter` wins over the trace's.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from gelato.power.base import Kind, Meter, MeterUnavailable

KINDS: tuple[Kind, ...] = ("measured", "estimated")  # what a trace may declare itself


def load_trace(path: str | Path) -> list[tuple[float, float]]:
    return load_trace_and_kind(path)[0]


def load_trace_and_kind(path: str | Path) -> tuple[list[tuple[float, float]], Kind]:
    """The samples and the trace's `kind` (`estimated` when it declares none)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise MeterUnavailable(f"cannot read power trace {p}: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]  # blank lines (a trailing one) are no samples
    try:
        if text.lstrip().startswith("{"):
            records: list[dict] = [json.loads(line) for line in lines]
        else:
            records = list(csv.DictReader(lines))
        rows = [(float(r["t_s"]), float(r["power_w"])) for r in records]
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise MeterUnavailable(f"power trace {p}: every sample needs numbers t_s and power_w ({exc!r})") from exc
    if not all(math.isfinite(t) and math.isfinite(w) for t, w in rows):
        raise MeterUnavailable(f"power trace {p}: t_s and power_w must be finite numbers")
    if any(w < 0 for _, w in rows):  # energy would run backwards (the live meters clip at 0 W)
        raise MeterUnavailable(f"power trace {p}: power_w must be >= 0, got {min(w for _, w in rows)}")
    if len(rows) < 2 or any(b[0] <= a[0] for a, b in itertools.pairwise(rows)):
        raise MeterUnavailable(f"power trace {p} needs >= 2 samples with increasing t_s")
    return rows, _declared_kind(p, records)


def _declared_kind(p: Path, records: list[dict]) -> Kind:
    # A CSV without the column has no key; one with the column but an empty cell reads "" (mixed).
    declared = {str(r["kind"]).strip() if r.get("kind") is not None else None for r in records}
    if declared == {None}:
        return "estimated"  # undeclared: nothing says a real meter recorded it
    if len(declared) > 1:
        raise MeterUnavailable(
            f"power trace {p}: kind must be the same on every sample, got {sorted(map(str, declared))}"
        )
    (kind,) = declared
    for known in KINDS:
        if kind == known:
            return known
    raise MeterUnavailable(f"power trace {p}: kind must be one of {', '.join(KINDS)}, got {kind!r}")


class ReplayMeter(Meter):
    source = "replay"

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.monotonic, kind: Kind | None = None) -> None:
        super().__init__(clock)
        self.trace, declared = load_trace_and_kind(path)
        self.kind = kind if kind is not None else declared
        self._t = [t for t, _ in self.trace]
        # Cumulative energy at each sample (trapezoids).
        self._cum = [0.0]
        for (t0, p0), (t1, p1) in itertools.pairwise(self.trace):
            self._cum.append(self._cum[-1] + 0.5 * (p0 + p1) * (t1 - t0))
        self._start = clock()

    def energy_at(self, elapsed_s: float) -> float:
        t = self._t[0] + max(0.0, elapsed_s)
        if t >= self._t[-1]:
            return self._cum[-1] + self.trace[-1][1] * (t - self._t[-1])
        i = bisect.bisect_right(self._t, t) - 1
        (t0, p0), (t1, p1) = self.trace[i], self.trace[i + 1]
        p_t = p0 + (p1 - p0) * (t - t0) / (t1 - t0)
        return self._cum[i] + 0.5 * (p0 + p_t) * (t - t0)

    def joules_at(self, now: float) -> float:
        return self.energy_at(now - self._start)
