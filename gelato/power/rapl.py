"""Intel RAPL through powercap sysfs: `energy_uj` counters with wraparound.

Contract: `RaplMeter(root)` sums the package zones: top-level `intel-rapl:N` zones whose `name` is
`package-P` (or `package-P-die-D` on multi-die parts). Subzones such as `intel-rapl:N:M` are parts of
their package and are not added again, and the top-level `psys` (platform) zone, which already
contains the packages, and any other non-package zone are left out. Each zone's counter wraps
at `max_energy_range_uj`; a read that goes backwards is a wrap. Unreadable counters (usually
root-only) raise `MeterUnavailable` naming the file. A read that fails mid-run (any zone) reads
NaN and changes nothing: the counters kept counting, so the next good read is exact again.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from pathlib import Path

from gelato.power.base import Meter, MeterUnavailable

ZONE = re.compile(r"^intel-rapl:\d+$")
PACKAGE = re.compile(r"^package-\d+(-die-\d+)?$")  # the kernel's names; `psys` is the platform zone


def _is_package(zone: Path) -> bool:
    if not ZONE.match(zone.name):
        return False
    try:
        return bool(PACKAGE.match((zone / "name").read_text().strip()))
    except OSError:  # no readable name: cannot tell a package from psys, so do not count it
        return False


class RaplMeter(Meter):
    source = "rapl"
    kind = "measured"

    def __init__(self, root: str | Path = "/sys/class/powercap", clock: Callable[[], float] | None = None) -> None:
        super().__init__(*(c for c in (clock,) if c))
        base = Path(root)
        zones = sorted(p for p in base.glob("intel-rapl:*") if _is_package(p)) if base.is_dir() else []
        if not zones:
            raise MeterUnavailable(f"no RAPL package zones under {base}")
        self.zones = zones
        self._lock = threading.Lock()
        try:
            self._range = [int((z / "max_energy_range_uj").read_text()) for z in zones]
            self._last = [self._counter(z) for z in zones]
        except PermissionError as exc:
            raise MeterUnavailable(f"cannot read {exc.filename} (RAPL counters are usually root-only)") from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read RAPL counters under {base}: {exc}") from exc
        self._total_uj = 0

    @staticmethod
    def _counter(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def joules_at(self, now: float) -> float:
        with self._lock:
            try:  # every zone first: a zone failing must not leave the others advanced
                counters = [self._counter(zone) for zone in self.zones]
            except (OSError, ValueError):
                return math.nan
            for i, counter in enumerate(counters):
                delta = counter - self._last[i]
                if delta < 0:  # wrapped at max_energy_range_uj
                    delta += self._range[i] + 1
                self._total_uj += delta
                self._last[i] = counter
            return self._total_uj / 1e6
