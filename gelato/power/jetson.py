"""Jetson power rails (INA3221 / INA238) through sysfs hwmon or the legacy iio files.

Contract: `JetsonMeter(roots)` finds rails under the INA drivers' i2c folders
(`/sys/bus/i2c/drivers/ina3221*/` and `ina238*`, hwmon or iio) and integrates their power × dt on a
sampler thread. A rail's power is `power*_input` (µW, INA238) or `in*_input` (mV) × `curr*_input`
(mA) (INA3221 hwmon), or `in_power*_input` (mW, legacy iio). If a board-input rail is present
(label `VDD_IN`, `POM_5V_IN` or `VIN_SYS_5V0`) only it is counted, since it already contains the
others; otherwise all rails are summed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gelato.power.base import Meter, MeterUnavailable, PowerIntegrator

DRIVER_ROOTS = ("/sys/bus/i2c/drivers",)
INPUT_RAILS = {"VDD_IN", "POM_5V_IN", "VIN_SYS_5V0"}


@dataclass(frozen=True)
class Rail:
    label: str
    files: tuple[Path, ...]
    scale_w: float  # product of the files' values times scale_w = watts

    def power_w(self) -> float:
        value = 1.0
        for f in self.files:
            value *= float(f.read_text().strip())
        return value * self.scale_w


def _label(folder: Path, stem: str, default: str) -> str:
    f = folder / f"{stem}_label"
    return f.read_text().strip() if f.exists() else default


def find_rails(driver_roots: tuple[str, ...] = DRIVER_ROOTS) -> list[Rail]:
    rails: list[Rail] = []
    for root in map(Path, driver_roots):
        for dev in sorted(root.glob("ina3221*/*")) + sorted(root.glob("ina238*/*")):
            for hw in sorted(dev.glob("hwmon/hwmon*")):
                for pw in sorted(hw.glob("power*_input")):  # INA238: µW
                    stem = pw.name.removesuffix("_input")
                    rails.append(Rail(_label(hw, stem, f"{dev.name}:{stem}"), (pw,), 1e-6))
                for volt in sorted(hw.glob("in*_input")):  # INA3221: mV × mA
                    n = volt.name.removeprefix("in").removesuffix("_input")
                    curr = hw / f"curr{n}_input"
                    if curr.exists():
                        rails.append(Rail(_label(hw, f"in{n}", f"{dev.name}:in{n}"), (volt, curr), 1e-6))
            for iio in sorted(dev.glob("iio:device*")):  # legacy L4T: mW
                for pw in sorted(iio.glob("in_power*_input")):
                    n = pw.name.removeprefix("in_power").removesuffix("_input")
                    name = iio / f"rail_name_{n}"
                    label = name.read_text().strip() if name.exists() else f"{dev.name}:power{n}"
                    rails.append(Rail(label, (pw,), 1e-3))
    return rails


class JetsonMeter(Meter):
    source = "jetson"
    kind = "measured"

    def __init__(
        self,
        driver_roots: tuple[str, ...] = DRIVER_ROOTS,
        interval_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        start_sampler: bool = True,
    ) -> None:
        super().__init__(clock)
        rails = find_rails(driver_roots)
        if not rails:
            raise MeterUnavailable(f"no INA3221/INA238 rails under {', '.join(driver_roots)}")
        inputs = [r for r in rails if r.label.upper() in INPUT_RAILS]
        self.rails = inputs[:1] or rails
        try:
            self.integrator = PowerIntegrator(self.power_w, interval_s, clock)
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read Jetson rails: {exc}") from exc
        if start_sampler:
            self.integrator.start()

    def power_w(self) -> float:
        return sum(r.power_w() for r in self.rails)

    def joules_at(self, now: float) -> float:
        return self.integrator.joules(now)

    def close(self) -> None:
        self.integrator.stop()
