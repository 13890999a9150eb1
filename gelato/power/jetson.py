"""Jetson power rails (INA3221 / INA238) through sysfs hwmon or the legacy iio files.

Contract: `JetsonMeter(roots)` finds rails under the INA drivers' i2c folders
(`/sys/bus/i2c/drivers/ina3221*/` and `ina238*`, hwmon or iio) and integrates their power × dt on a
sampler thread. A rail's power is, per driver (Linux hwmon ina3221 / ina238 documentation):
INA3221 hwmon, channels 1-3 only: bus `in{n}_input` (mV) × `curr{n}_input` (mA), named by
`in{n}_label`, skipped when `in{n}_enable` reads 0 (a disabled channel's inputs read ENODATA);
`in4`-`in6` are shunt voltages (µV) and `in7` / `curr4` the sums, never rails. INA238 hwmon:
`power1_input` (µW) alone (its `in1` × `curr1` is the same rail again). Legacy iio:
`in_power*_input` (mW). If a board-input rail is present (label `VDD_IN` or `POM_5V_IN`) only it
is counted, since it already contains the others; otherwise (AGX Orin: `VDD_GPU_SOC`,
`VDD_CPU_CV` and `VIN_SYS_5V0` are parallel branches) all rails are
summed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gelato.power.base import Meter, MeterUnavailable, PowerIntegrator

DRIVER_ROOTS = ("/sys/bus/i2c/drivers",)
# Rails that carry the whole module's input (Orin Nano/NX, Xavier NX: VDD_IN; Nano, TX2:
# POM_5V_IN). Not AGX Orin's VIN_SYS_5V0: there it is one branch beside VDD_GPU_SOC and VDD_CPU_CV
# (tegrastats shows the two compute rails above it under load), so those rails are summed.
INPUT_RAILS = {"VDD_IN", "POM_5V_IN"}


@dataclass(frozen=True)
class Rail:
    label: str
    files: tuple[Path, ...]
    scale_w: float  # product of the files' values times scale_w = watts

    def power_w(self) -> float:
        value = 1.0
        for f in self.files:
            value *= float(f.read_text().strip())
        # The INA3221 reports signed current: an idle rail's offset can read a little below 0,
        # which no rail supplies back; summed with the others it would take from their energy.
        return max(value * self.scale_w, 0.0)


def _label(folder: Path, stem: str, default: str) -> str:
    f = folder / f"{stem}_label"
    return f.read_text().strip() if f.exists() else default


INA3221_RAILS = (1, 2, 3)  # in1-3 bus mV with curr1-3 mA; in4-6 are shunt µV, in7 / curr4 sums


def _ina3221_hwmon(dev: Path, hw: Path) -> list[Rail]:
    rails: list[Rail] = []
    for n in INA3221_RAILS:
        volt, curr, enable = hw / f"in{n}_input", hw / f"curr{n}_input", hw / f"in{n}_enable"
        if not (volt.exists() and curr.exists()):
            continue
        if enable.exists() and enable.read_text().strip() == "0":
            continue  # disabled (or disconnected in the device tree): its inputs read ENODATA
        rails.append(Rail(_label(hw, f"in{n}", f"{dev.name}:in{n}"), (volt, curr), 1e-6))
    return rails


def _ina238_hwmon(dev: Path, hw: Path) -> list[Rail]:
    # power1_input (µW) is the rail; in0 (shunt mV), in1 (bus mV) and curr1 (mA) describe it again.
    rails: list[Rail] = []
    for pw in sorted(hw.glob("power*_input")):
        stem = pw.name.removesuffix("_input")
        rails.append(Rail(_label(hw, stem, f"{dev.name}:{stem}"), (pw,), 1e-6))
    return rails


def find_rails(driver_roots: tuple[str, ...] = DRIVER_ROOTS) -> list[Rail]:
    rails: list[Rail] = []
    for root in map(Path, driver_roots):
        devices = [(dev, _ina3221_hwmon) for dev in sorted(root.glob("ina3221*/*"))]
        devices += [(dev, _ina238_hwmon) for dev in sorted(root.glob("ina238*/*"))]
        for dev, hwmon_rails in devices:
            for hw in sorted(dev.glob("hwmon/hwmon*")):
                rails += hwmon_rails(dev, hw)
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
        try:
            rails = find_rails(driver_roots)
        except OSError as exc:  # a label or enable file unreadable: no meter here, not a crash of `auto`
            raise MeterUnavailable(f"cannot read Jetson rails: {exc}") from exc
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

    def joules_epoch_at(self, now: float) -> tuple[float, int]:
        return self.integrator.joules_epoch(now)

    def close(self) -> None:
        self.integrator.stop()
