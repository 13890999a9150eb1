"""Replay a recorded power trace as a meter (tests, simulation).

Contract: `ReplayMeter(path)` reads a trace of `(t_s, power_w)` samples — CSV with a header
`t_s,power_w` or JSONL objects with those keys — and reports the energy of the piecewise-linear
power curve from the trace's start to (now − meter start), holding the last power past the end.
Labelled `measured` by default (a recording of a real meter); pass `kind="estimated"` for a
synthetic trace.
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


def load_trace(path: str | Path) -> list[tuple[float, float]]:
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
    if len(rows) < 2 or any(b[0] <= a[0] for a, b in itertools.pairwise(rows)):
        raise MeterUnavailable(f"power trace {p} needs >= 2 samples with increasing t_s")
    return rows


class ReplayMeter(Meter):
    source = "replay"

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.monotonic, kind: Kind = "measured") -> None:
        super().__init__(clock)
        self.trace = load_trace(path)
        self.kind = kind
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
