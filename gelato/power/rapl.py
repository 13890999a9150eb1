"""Intel RAPL through powercap sysfs: `energy_uj` counters with wraparound.

Contract: `RaplMeter(root)` sums the package zones: top-level `intel-rapl:N` zones whose `name` is
`package-P` (or `package-P-die-D` on multi-die parts; a die zone that mirrors another die's
counter, as every die of a multi-die AMD part reads the one socket counter, counted once), and
their `dram` subzones (servers: the DRAM domain is not inside the package counter; a memory-bound
drafter spends much of its energy there).
Other subzones (`core`, `uncore`) are parts of their package and are not added again, and the
top-level `psys` (platform) zone, which already contains the packages, and any other non-package
zone are left out. Each zone's counter wraps at
`max_energy_range_uj`. A counter that goes backwards is taken for one wrap only when the energy that
implies over the clock time since the last read is a power the package can draw (`max_power_w`: 4x
the largest `constraint_*_max_power_uw` of the zone, else 1000 W); otherwise the counter was reset
(driver reload, resume from suspend, firmware). (A step forwards is energy the counter counted and
is not bounded, so real bursts above the bound are never dropped.) Two reads further apart than half
the time a counter takes to wrap at that power (`max_gap_s`) may hide whole wraps. In either case
the energy across that interval is unknown: the meter counts from a new epoch (`Reading.epoch`, from
0 J at that read; `since()` across it is NaN) and logs a warning (once per meter, then at DEBUG), so
no total holds energy invented by a reset or a hidden wrap. A keeper thread reads the counters every
quarter of `max_gap_s`, at most every second (with the usual ~262 kJ range `max_gap_s` is 1.5 min at a
350 W server part's limit, 4 min at 125 W, 2 min without a stated limit), so however seldom a caller
reads, no wrap is hidden; `close()` stops it. A reset passes for a wrap only when the counter stood
within the bound's power × the time since the last read of its range's top (the apparent wrap then
fits the bound): with reads at most a second apart, under ~1 kJ (at 1000 W) of ~262 kJ, so about one
reset in 260 adds up to that much energy unseen. Unreadable counters (usually root-only) raise
`MeterUnavailable` naming the file, as do zones stating no range (`max_energy_range_uj` 0, on
some older systems: no wrap could be told from a reset, so `auto` moves on), and counters that do
not move within `COUNTING_PROBE_S` of the meter's start (frozen, as some VMs expose them: 0 J read
as measured). A read that fails
mid-run (any zone) reads NaN and changes nothing: the counters kept counting, so the next good
read is exact again (if within `max_gap_s` of the last good one).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gelato.power.base import Meter, MeterUnavailable

log = logging.getLogger(__name__)

ZONE = re.compile(r"^intel-rapl:\d+$")
SUBZONE = re.compile(r"^intel-rapl:\d+:\d+$")
PACKAGE = re.compile(r"^package-\d+(-die-\d+)?$")  # the kernel's names; `psys` is the platform zone
DIE = re.compile(r"^package-(\d+)-die-\d+$")  # a multi-die part's zone: its package number

# The most a package can plausibly draw, for telling a wrap from a reset. A zone's
# `constraint_*_max_power_uw` are its rated limits (PL1 = TDP; PL2/PL4 where the kernel shows
# them); turbo runs above TDP, up to ~3.7x on 15 W laptop parts (55 W PL2), so 4x the largest
# stated limit is above any draw the firmware allows for longer than a moment. Without a stated
# limit, 1000 W: no CPU package draws that (the largest server parts are rated ~500 W). Both are
# far below the apparent power of a reset from anywhere but the top of the range (module docstring).
LIMIT_MARGIN = 4.0
FALLBACK_MAX_W = 1000.0
# A wrap read just after the previous read may show a little more than max power x dt: the counter
# advances in ~1 ms steps and a sysfs read is not atomic with the clock. 10 ms of max power is
# that slack (10 J at 1000 W, nothing beside a range of ~262 kJ).
SLACK_S = 0.01
# How often the keeper thread reads: a quarter of `max_gap_s`, within these bounds (a sysfs read
# per zone every second costs nothing measurable; the shorter the interval, the less energy a
# reset near the top of the range can pass off as a wrap).
KEEP_MIN_S, KEEP_MAX_S = 0.5, 1.0
# A package never draws 0 W, and its counter moves every ~1 ms: counters that stay put this long
# are frozen (some VMs expose powercap counters that never count), and would report 0 J as
# measured. 0: no check (tests on static fake trees).
COUNTING_PROBE_S = 0.25


def _counted(zone: Path) -> bool:
    """A package zone, or a package's `dram` subzone (outside the package counter)."""
    if not (ZONE.match(zone.name) or SUBZONE.match(zone.name)):
        return False
    try:
        name = (zone / "name").read_text().strip()
    except OSError:  # no readable name: cannot tell a package from psys, so do not count it
        return False
    return bool(PACKAGE.match(name)) if ZONE.match(zone.name) else name == "dram"


def max_power_w(zone: Path) -> float:
    """The most this package zone can plausibly draw (see LIMIT_MARGIN, FALLBACK_MAX_W)."""
    limits = []
    for path in zone.glob("constraint_*_max_power_uw"):
        try:
            uw = int(path.read_text())
        except (OSError, ValueError):  # unreadable or absent on this part: not a limit
            continue
        if uw > 0:
            limits.append(uw / 1e6)
    return LIMIT_MARGIN * max(limits) if limits else FALLBACK_MAX_W


def _without_mirrored_dies(zones: list[Path], counter: Callable[[Path], int], tries: int = 3) -> list[Path]:
    """`zones` less each `package-P-die-D` zone that mirrors an earlier die of the same package:
    on multi-die AMD parts every die zone reads the one socket-wide counter (summing them counts
    the package once per die), while Intel's multi-die parts count each die apart. A mirror reads
    the same value in the same instant; separate dies, counting microjoules, essentially never do.
    Reads the counters up to `tries` times (a mirror's two reads can straddle one of its ~1 ms
    updates)."""
    dies: dict[str, list[Path]] = {}
    for z in zones:
        name = (z / "name").read_text().strip() if ZONE.match(z.name) else ""
        if m := DIE.match(name):
            dies.setdefault(m.group(1), []).append(z)
    mirrors: set[Path] = set()
    for group in (g for g in dies.values() if len(g) > 1):
        for _ in range(tries):
            values = [counter(z) for z in group]
            mirrors |= {z for i, z in enumerate(group) if values[i] in values[:i]}
    if mirrors:
        log.info("RAPL: %s mirror another die's counter; counted once", ", ".join(sorted(z.name for z in mirrors)))
    # A dropped die's own subzones (`dram`) go with it: they mirror the kept die's too.
    return [z for z in zones if z not in mirrors and not any(z.name.startswith(m.name + ":") for m in mirrors)]


class RaplMeter(Meter):
    source = "rapl"
    kind = "measured"

    def __init__(self, root: str | Path = "/sys/class/powercap", clock: Callable[[], float] | None = None) -> None:
        super().__init__(*(c for c in (clock,) if c))
        base = Path(root)
        zones = sorted(p for p in base.glob("intel-rapl:*") if _counted(p)) if base.is_dir() else []
        if not any(ZONE.match(z.name) for z in zones):
            raise MeterUnavailable(f"no RAPL package zones under {base}")
        self._lock = threading.Lock()
        try:
            zones = _without_mirrored_dies(zones, self._counter)
            self._range = [int((z / "max_energy_range_uj").read_text()) for z in zones]
            self._last = [self._counter(z) for z in zones]
        except PermissionError as exc:
            raise MeterUnavailable(f"cannot read {exc.filename} (RAPL counters are usually root-only)") from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read RAPL counters under {base}: {exc}") from exc
        self.zones = zones
        if bad := [z.name for z, r in zip(zones, self._range, strict=True) if r <= 0]:
            # No range: a wrap cannot be told from a reset, and every read would be a new epoch.
            raise MeterUnavailable(f"RAPL zones {', '.join(bad)} under {base} state no max_energy_range_uj (0)")
        if clock is None and COUNTING_PROBE_S > 0:
            self._check_counting(base)
        self.max_power_w = [max_power_w(z) for z in zones]
        # Reads further apart than this may hide a whole wrap of some zone (see the docstring).
        self.max_gap_s = min(0.5 * (r + 1) / 1e6 / w for r, w in zip(self._range, self.max_power_w, strict=True))
        self._t = self.clock()  # when `_last` was read
        self._total_uj = 0
        self._epoch = 0
        self._warned = False
        # A keeper thread reads the counters well within `max_gap_s`, so that a wrap is never
        # hidden between a caller's reads (a long probe window, a device waiting minutes for its
        # edge). Only on the real clock: tests driving a fake clock read when they choose.
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        if clock is None:
            self.keep_s = min(max(self.max_gap_s / 4, KEEP_MIN_S), KEEP_MAX_S)
            self._keeper = threading.Thread(target=self._keep, name="rapl-keeper", daemon=True)
            self._keeper.start()

    def _check_counting(self, base: Path) -> None:
        """Raise `MeterUnavailable` unless some counter moves within `COUNTING_PROBE_S`."""
        deadline = time.monotonic() + COUNTING_PROBE_S
        while time.monotonic() < deadline:
            time.sleep(0.002)
            try:
                counters = [self._counter(z) for z in self.zones]
            except (OSError, ValueError) as exc:
                raise MeterUnavailable(f"cannot read RAPL counters under {base}: {exc}") from exc
            if counters != self._last:
                self._last = counters  # the meter counts from here (`_t` is read next)
                return
        raise MeterUnavailable(
            f"RAPL counters under {base} did not move in {COUNTING_PROBE_S} s: frozen (as some VMs expose them), "
            "they would read 0 J"
        )

    def _keep(self) -> None:
        while not self._stop.wait(self.keep_s):
            self.read()

    def close(self) -> None:
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout=1.0)

    @staticmethod
    def _counter(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def joules_at(self, now: float) -> float:
        return self.joules_epoch_at(now)[0]

    def joules_epoch_at(self, now: float) -> tuple[float, int]:
        with self._lock:
            try:  # every zone first: a zone failing must not leave the others advanced
                counters = [self._counter(zone) for zone in self.zones]
            except (OSError, ValueError):
                return math.nan, self._epoch
            t = self.clock()  # the counters' time (`now` may predate waiting for the lock)
            dt = max(0.0, t - self._t)
            deltas, unknown = [], ""
            for i, counter in enumerate(counters):
                delta = counter - self._last[i]
                if delta < 0:  # a wrap at max_energy_range_uj, if the power that implies is plausible
                    delta += self._range[i] + 1
                    if delta / 1e6 > self.max_power_w[i] * (dt + SLACK_S):
                        unknown = (
                            f"{self.zones[i].name} went back from {self._last[i]} to {counter} uJ in {dt:.3f} s, "
                            f"which as a wrap would be {delta / 1e6:.0f} J (above {self.max_power_w[i]:.0f} W): "
                            "a reset"
                        )
                deltas.append(delta)
            if dt > self.max_gap_s:
                unknown = (
                    f"reads {dt:.1f} s apart, more than the {self.max_gap_s:.1f} s within which a counter "
                    "cannot wrap unseen"
                )
            self._last, self._t = counters, t
            if unknown:  # the interval's energy is unknown: nothing of it counts, a new epoch from 0 J
                self._epoch, self._total_uj = self._epoch + 1, 0
                (log.debug if self._warned else log.warning)(
                    "RAPL: %s; the energy across that interval is unknown (counting again from here)", unknown
                )
                self._warned = True
            else:
                self._total_uj += sum(deltas)
            return self._total_uj / 1e6, self._epoch
