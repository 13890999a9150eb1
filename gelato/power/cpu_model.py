"""Estimated device energy from CPU time and a named device profile.

Contract: `CpuModelMeter(profile)` reports `process CPU seconds × active W per core + idle W ×
wall seconds` since creation, always labelled `estimated`. CPU seconds are `time.process_time()`
(user + system of every thread of this process, at clock resolution). The profiles are rough
public figures, documented here, not measurements: use a measured meter when the hardware has one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gelato.power.base import Meter


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    active_w_per_core: float  # extra power of one fully busy core
    idle_w: float  # whole-device floor while the process runs
    note: str


PROFILES = {
    p.name: p
    for p in (
        # Phone-class SoC: a big Cortex-A7x/X core draws ~1-3 W flat out; screen-off idle ~0.3-0.6 W.
        DeviceProfile("phone", 2.0, 0.5, "phone-class big core ~2 W active, ~0.5 W idle (rough public figures)"),
        # Jetson Orin Nano (7-15 W modes): ~1 W per A78AE core busy, module idle ~4 W.
        DeviceProfile("jetson-orin-nano", 1.0, 4.0, "Jetson Orin Nano: ~1 W/core active, ~4 W module idle"),
        # Laptop x86: ~4-8 W per P-core busy at boost, ~3 W package idle with screen off.
        DeviceProfile("laptop", 6.0, 3.0, "x86 laptop: ~6 W per busy core, ~3 W idle"),
    )
}


class CpuModelMeter(Meter):
    source = "cpu-model"
    kind = "estimated"

    def __init__(
        self,
        profile: str | DeviceProfile = "phone",
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(clock)
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(f"unknown device profile {profile!r}; known: {', '.join(PROFILES)}")
            profile = PROFILES[profile]
        self.profile = profile
        self.cpu_seconds = cpu_seconds or _process_cpu_seconds
        self._cpu0, self._t0 = self.cpu_seconds(), clock()

    def joules_at(self, now: float) -> float:
        cpu = self.cpu_seconds() - self._cpu0
        wall = now - self._t0
        return cpu * self.profile.active_w_per_core + wall * self.profile.idle_w


def _process_cpu_seconds() -> float:
    # CPU time of every thread of this process at clock resolution (CLOCK_PROCESS_CPUTIME_ID).
    # psutil's cpu_times() counts in scheduler ticks (10 ms here): a 30 ms round's energy then
    # jumped in 20 mJ steps and the controller could not tell drafting power from waiting power.
    return time.process_time()
