"""Meter interface shared by every energy source.

Contract: a `Meter` reports cumulative joules since it was created, with its source name and
whether the figure is `measured` or `estimated`. Opening a meter whose sensor is absent or
unreadable raises `MeterUnavailable` with the reason; `NullMeter` (no sensor chosen) reads NaN —
never 0 J. Meters are cheap to
read (no sleeping); the ones that integrate power sample on a background thread and read the sensor
once more at each read (a sysfs or NVML power read on the caller's thread; none while reads fail).
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
    """Integrates a power function (W) over time, sampled on a thread and at every read.

    Used where the hardware gives power, not energy (Jetson rails, NVML without the energy counter).
    Each interval between two samples counts at the power read at its end (right rectangle), and a
    read (`joules_epoch`) is itself a sample: so a phase between two reads (a round's drafting, its
    wait for the edge) is charged the powers read during it and at its end, not the power held from
    before it began. (Holding each sample's power until the next one charged a 15 ms drafting phase
    mostly at the idle power sampled before it: a third of its energy, at a 20 ms interval.) Reads
    never go backwards, and later samples keep exactly what reads reported: every reading is the
    integral of one step function up to its time. Against the trapezoid rule the total differs by a
    boundary term of one sample (½·(p_first − p_last)·interval at a steady interval), not a drift.
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

    def _read_power(self) -> float:
        """One power reading. A read that fails (an I/O error on a rail, a driver error) is a
        dropped sample: the last power stands for its interval, as a sample would have. Failing for
        `FAILED_READS_S` on end, the meter can no longer read: its energy is NaN from then on
        (unmeasured, for the deficit queue and the reports), instead of the sampler thread dying at
        the first failure and the last power being integrated for the rest of the run."""
        try:
            p = float(self.power_w())
            self._failing_since = None
            return 0.0 if p < 0 else p  # a sensor offset below 0 W: never energy going backwards (NaN kept)
        except Exception:
            now = self.clock()
            # A local: the sampler thread and a caller's read both get here, and the other's
            # successful read may reset the field between a store and a load.
            since = self._failing_since if self._failing_since is not None else now
            self._failing_since = since
            return math.nan if now - since >= FAILED_READS_S else self._p

    def _advance(self, t: float, p: float) -> None:
        """Under the lock: the interval up to `t` at the power `p` read at its end. Once reads work
        again after an outage the meter counts from a new epoch (`Reading.epoch`): only energy
        across the outage stays unknown, not every reading after it."""
        if math.isnan(self._p) and not math.isnan(p):  # the sensor is back: a new epoch from 0 J
            self._epoch, self._j = self._epoch + 1, 0.0
        else:
            self._j += p * max(0.0, t - self._t)
        self._t, self._p = max(t, self._t), p

    def sample(self) -> None:
        p = self._read_power()
        with self._lock:  # time taken under the lock: a read that saw the old state has an earlier time
            self._advance(self.clock(), p)

    def joules(self, now: float | None = None) -> float:
        return self.joules_epoch(now)[0]

    def joules_epoch(self, now: float | None = None) -> tuple[float, int]:
        """The joules up to `now` (default: the clock now) and their epoch, the sensor read for the
        interval since the last sample. A `now` before the last sample (the sampler thread sampled
        after the caller read its clock) gets the energy up to that sample: never less than before."""
        # While reads fail, the sampler thread alone tries again: a sensor that times out (an I2C
        # rail) would stall the caller at every read. The last power stands meanwhile.
        p = self._p if self._failing_since is not None else self._read_power()
        with self._lock:
            self._advance(self.clock() if now is None else now, p)
            return self._j, self._epoch

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
