"""Meter interface shared by every energy source.

Contract: a `Meter` reports cumulative joules since it was created, with its source name and
whether the figure is `measured` or `estimated`. Opening a meter whose sensor is absent or
unreadable raises `MeterUnavailable` with the reason; `NullMeter` (no sensor chosen) reads NaN —
never 0 J. Meters are cheap to
read (no sleeping); the ones that integrate power sample on a background thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["measured", "estimated", "unavailable"]


@dataclass(frozen=True)
class Reading:
    joules: float  # cumulative since the meter started (or its `epoch` began); NaN when unavailable
    source: str  # nvml, rapl, jetson, cpu-model, replay, none
    kind: Kind
    t_s: float  # monotonic clock of the reading
    # A meter that lost its sensor for a while and read again counts from a new epoch: energy
    # between readings of two epochs is unknown (the outage), energy within one is exact.
    epoch: int = 0

    @property
    def valid(self) -> bool:
        return math.isfinite(self.joules)

    def since(self, start: Reading) -> float:
        """Joules from `start` to this reading: NaN when either is unknown or an outage lies between."""
        return self.joules - start.joules if self.epoch == start.epoch else math.nan


class MeterUnavailable(RuntimeError):
    """This source does not exist or cannot be read on this host; the message says why."""


class Meter:
    source = "none"
    kind: Kind = "measured"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock

    def joules(self) -> float:
        return self.joules_at(self.clock())

    def joules_at(self, now: float) -> float:
        """Cumulative joules as of clock time `now` (a meter that reads hardware ignores it)."""
        raise NotImplementedError

    def joules_epoch_at(self, now: float) -> tuple[float, int]:
        """`joules_at(now)` and the epoch it counts in (meters that never restart: always 0)."""
        return self.joules_at(now), 0

    def read(self) -> Reading:
        # One clock value for both fields, so energy / time ratios of time-based meters are exact.
        now = self.clock()
        joules, epoch = self.joules_epoch_at(now)
        return Reading(joules=joules, source=self.source, kind=self.kind, t_s=now, epoch=epoch)

    def close(self) -> None:
        """Release sensors or threads (idempotent)."""


class NullMeter(Meter):
    """No sensor: every reading is NaN, so nothing downstream mistakes it for 0 J."""

    source = "none"
    kind: Kind = "unavailable"

    def joules_at(self, now: float) -> float:
        return math.nan


# How long a power sensor may fail to read before its meter's energy becomes unknown (NaN).
FAILED_READS_S = 1.0


class PowerIntegrator:
    """Integrates a power function (W) over time on a sampler thread, holding each sample's power.

    Used where the hardware gives power, not energy (Jetson rails, NVML without the energy counter).
    Each sample's power counts until the next sample (left rectangle rule), and `joules()` adds the
    partial interval since the last sample by the same rule, so every reading is the integral of one
    step function up to its time: reads never go backwards and later samples keep exactly what reads
    reported. (A trapezoid needs the next sample, which a read between samples does not have; mixing
    the two rules made readings fall when power fell.) Over a run this differs from the trapezoid
    total by ½·Σ(p[i+1] - p[i])·dt[i], which telescopes to ½·(p_last - p_first)·interval at a steady
    interval: a boundary term of one sample, not a drift.
    """

    def __init__(self, power_w: Callable[[], float], interval_s: float, clock: Callable[[], float]) -> None:
        self.power_w = power_w
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._t = clock()
        self._p = power_w()
        self._j = 0.0
        self._epoch = 0  # one more each time the sensor reads again after an outage
        self._failing_since: float | None = None  # when reads began to fail (None: the last one worked)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """One power reading. A read that fails (an I/O error on a rail, a driver error) is a
        dropped sample: the last power holds for one more interval, as between any two samples.
        Failing for `FAILED_READS_S` on end, the meter can no longer read: its energy is NaN from
        then on (unmeasured, for the deficit queue and the reports), instead of the sampler thread
        dying at the first failure and the last power being integrated for the rest of the run.
        Once reads work again the meter counts from a new epoch (`Reading.epoch`): only energy
        across the outage stays unknown, not every reading after it."""
        try:
            p = float(self.power_w())
            p = 0.0 if p < 0 else p  # a sensor offset below 0 W: never energy going backwards (NaN kept)
            self._failing_since = None
        except Exception:
            now = self.clock()
            self._failing_since = self._failing_since if self._failing_since is not None else now
            p = math.nan if now - self._failing_since >= FAILED_READS_S else self._p
        with self._lock:  # time taken under the lock: a read that saw the old state has an earlier time
            t = self.clock()
            if math.isnan(self._p) and not math.isnan(p):  # the sensor is back: a new epoch from 0 J
                self._epoch, self._j = self._epoch + 1, 0.0
            else:
                self._j += self._p * max(0.0, t - self._t)
            self._t, self._p = t, p

    def joules(self, now: float | None = None) -> float:
        return self.joules_epoch(now)[0]

    def joules_epoch(self, now: float | None = None) -> tuple[float, int]:
        with self._lock:
            t = self.clock() if now is None else now
            return self._j + self._p * max(0.0, t - self._t), self._epoch

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
