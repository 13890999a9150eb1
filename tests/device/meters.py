"""A meter for device tests: a constant power, so every energy is a time and expected values are exact."""

from __future__ import annotations

import time

from gelato.power import Meter


class OneWatt(Meter):
    """1 W, always: joules are seconds since the meter started (on `time.perf_counter`)."""

    source, kind = "test", "measured"

    def __init__(self) -> None:
        super().__init__(time.perf_counter)
        self.t0 = time.perf_counter()

    def joules_at(self, now: float) -> float:
        return now - self.t0
