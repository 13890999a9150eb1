"""Jetson power rails on fake sysfs trees (INA3221, INA238, legacy IIO) and the power integrator that
turns their sampled power into energy: each phase charged its own power, failed reads, never backwards."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from gelato.power import MeterUnavailable
from gelato.power.jetson import JetsonMeter
from tests.gelato.test_power import FakeClock, write

# ---- Jetson -------------------------------------------------------------------------------


def test_jetson_ina3221_prefers_board_input_rail(tmp_path: Path) -> None:
    hw = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    for n, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1000), ("VDD_CPU_GPU_CV", 5000, 400)], 1):
        write(hw / f"in{n}_label", label)
        write(hw / f"in{n}_input", mv)
        write(hw / f"curr{n}_input", ma)
    clock = FakeClock()
    meter = JetsonMeter((str(tmp_path),), clock=clock, start_sampler=False)
    assert [r.label for r in meter.rails] == ["VDD_IN"]
    assert meter.power_w() == pytest.approx(5.0)
    clock.t += 1.0
    meter.integrator.sample()
    write(hw / "curr1_input", 2000)  # 10 W from here
    clock.t += 1.0
    meter.integrator.sample()
    assert meter.joules() == pytest.approx(5.0 + 10.0)  # each interval at the power read at its end
    clock.t += 0.5
    assert meter.joules() == pytest.approx(15.0 + 5.0)  # a read samples too: 10 W for the half second


def test_jetson_rails_that_cannot_be_read_are_no_meter(tmp_path: Path) -> None:
    """A label or enable file that cannot be read (a directory here, EISDIR: a permission-denied or
    broken sysfs file alike) makes the meter unavailable, so `auto` goes on; it was an OSError out
    of `auto` and `gelato-energy probe`."""
    hw = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    write(hw / "in1_input", 5000)
    write(hw / "curr1_input", 1000)
    (hw / "in1_label").mkdir()
    with pytest.raises(MeterUnavailable, match="cannot read Jetson rails"):
        JetsonMeter((str(tmp_path),), clock=FakeClock(), start_sampler=False)


def test_jetson_agx_orin_sums_its_branches(tmp_path: Path) -> None:
    """AGX Orin's INA3221 measures VDD_GPU_SOC, VDD_CPU_CV and VIN_SYS_5V0 as parallel branches
    (tegrastats shows the compute rails above VIN_SYS_5V0 under load): all three are summed (only
    the 5 V system rail was counted, a tenth of the module's power under GPU load)."""
    hw = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    rails = [("VDD_GPU_SOC", 5000, 8000), ("VDD_CPU_CV", 5000, 1000), ("VIN_SYS_5V0", 5000, 900)]
    for n, (label, mv, ma) in enumerate(rails, 1):
        write(hw / f"in{n}_label", label)
        write(hw / f"in{n}_input", mv)
        write(hw / f"curr{n}_input", ma)
    meter = JetsonMeter((str(tmp_path),), start_sampler=False)
    assert [r.label for r in meter.rails] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert meter.power_w() == pytest.approx(40.0 + 5.0 + 4.5)


def test_a_rail_reading_below_zero_takes_no_energy_from_the_others(tmp_path: Path) -> None:
    """The INA3221 reports signed current: an idle AGX Orin branch at -5 mA counts as 0 W in the
    sum, and a meter whose whole reading dips below 0 integrates 0 W, never going backwards."""
    from gelato.power.base import PowerIntegrator

    hw = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    rails = [("VDD_GPU_SOC", 5000, 2000), ("VDD_CPU_CV", 5000, -5), ("VIN_SYS_5V0", 5000, 900)]
    for n, (label, mv, ma) in enumerate(rails, 1):
        write(hw / f"in{n}_label", label)
        write(hw / f"in{n}_input", mv)
        write(hw / f"curr{n}_input", ma)
    meter = JetsonMeter((str(tmp_path),), start_sampler=False)
    assert meter.power_w() == pytest.approx(10.0 + 0.0 + 4.5)
    clock, power = FakeClock(), [2.0]
    integ = PowerIntegrator(lambda: power[0], 0.1, clock)
    readings = []
    for w in (2.0, -0.3, -0.1, 1.0):
        power[0] = w
        clock.t += 0.1
        integ.sample()
        readings.append(integ.joules())
    assert readings == sorted(readings) and readings[-1] == pytest.approx(0.2 + 0.0 + 0.0 + 0.1)


def test_a_short_phase_between_reads_is_charged_its_own_power() -> None:
    """Rounds of 15 ms drafting at 10 W and 35 ms waiting at 2 W, sampled every 20 ms and read at
    each phase's start and end (as the device's accountant reads its meter): the drafting phases
    get their own 10 W, 0.15 J each. Holding each sample's power until the next one charged them
    0.03-0.07 J (the waiting power sampled before they began), which the controller fitted as the
    drafting power."""
    from gelato.power.base import PowerIntegrator

    clock, power = FakeClock(), [2.0]
    meter = PowerIntegrator(lambda: power[0], 0.02, clock)
    t0 = clock.t
    next_sample, drafting_j = t0 + 0.02, []

    def until(t: float) -> None:  # the sampler thread's samples up to `t`
        nonlocal next_sample
        while next_sample < t - 1e-12:
            clock.t = next_sample
            meter.sample()
            next_sample += 0.02
        clock.t = t

    for r in range(20):
        until(t0 + r * 0.05)
        start = meter.joules()  # the wait before ends: its power is still read here
        power[0] = 10.0
        until(t0 + r * 0.05 + 0.015)
        drafting_j.append(meter.joules() - start)
        power[0] = 2.0
    assert drafting_j == pytest.approx([0.15] * 20)


def test_a_failing_sensor_read_is_a_dropped_sample_then_unknown_energy(tmp_path: Path) -> None:
    """One failed read is a dropped sample: the last power stands for its interval; reads failing for
    `FAILED_READS_S` make the energy unknown (NaN, unmeasured) from then on. The sampler thread
    died at the first failure and the last power was integrated for the rest of the run."""
    from gelato.power.base import FAILED_READS_S, PowerIntegrator

    clock, power, fail, reads = FakeClock(), [5.0], [False], [0]

    def read() -> float:
        reads[0] += 1
        if fail[0]:
            raise OSError("I/O error")
        return power[0]

    meter = PowerIntegrator(read, 0.1, clock)
    clock.t += 0.1
    fail[0] = True
    meter.sample()  # failed: the last power, 5 W, stands for the interval it ends
    clock.t += 0.1
    fail[0], power[0] = False, 0.0
    meter.sample()
    clock.t += 0.1
    meter.sample()
    assert meter.joules() == pytest.approx(5.0 * 0.1)  # 5 W over the first interval, then 0 W
    fail[0] = True
    meter.sample()
    asked = reads[0]
    meter.joules()  # while reads fail, a caller's read does not ask the sensor (the sampler does)
    assert reads[0] == asked
    clock.t += FAILED_READS_S
    meter.sample()  # failing for FAILED_READS_S now: unknown
    clock.t += 0.1
    assert math.isnan(meter.joules())
    meter.start()  # the sampler thread survives failing reads
    before, deadline = reads[0], time.monotonic() + 30
    while reads[0] < before + 3 and time.monotonic() < deadline:  # three failing reads, however slow the machine
        time.sleep(0.05)
    assert reads[0] >= before + 3 and meter._thread is not None and meter._thread.is_alive()
    meter.stop()


def test_jetson_ina3221_sums_channels_1_to_3_only(tmp_path: Path) -> None:
    # No board-input label (AGX Xavier style): all rails are summed, so a phantom 4th rail would count.
    hw = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    for n, (label, mv, ma) in enumerate([("GPU", 5000, 400), ("CPU", 5000, 600), ("SOC", 5000, 1000)], 1):
        write(hw / f"in{n}_label", label)
        write(hw / f"in{n}_enable", 1)
        write(hw / f"in{n}_input", mv)  # bus voltage, mV
        write(hw / f"curr{n}_input", ma)
    for n, uv in [(4, 20_000), (5, 30_000), (6, 50_000), (7, 100_000)]:
        write(hw / f"in{n}_input", uv)  # in4-6: shunt voltages of channels 1-3, in7 their sum (uV)
    write(hw / "in7_label", "sum of shunt voltages")
    write(hw / "curr4_input", 2000)  # sum of the three currents, mA
    meter = JetsonMeter((str(tmp_path),), start_sampler=False)
    assert [r.label for r in meter.rails] == ["GPU", "CPU", "SOC"]
    assert meter.power_w() == pytest.approx(2.0 + 3.0 + 5.0)
    # a disabled channel (the driver answers ENODATA for its inputs) is not a rail either
    write(hw / "in3_enable", 0)
    assert [r.label for r in JetsonMeter((str(tmp_path),), start_sampler=False).rails] == ["GPU", "CPU"]


def test_jetson_ina238_counts_power1_once(tmp_path: Path) -> None:
    hw = tmp_path / "ina238" / "2-0044" / "hwmon" / "hwmon1"
    write(hw / "in0_input", 2)  # shunt voltage, mV
    write(hw / "in1_input", 12_000)  # bus voltage, mV
    write(hw / "curr1_input", 250)  # mA: the same 3 W rail as power1
    write(hw / "power1_input", 3_000_000)  # uW
    meter = JetsonMeter((str(tmp_path),), start_sampler=False)
    assert [r.label for r in meter.rails] == ["2-0044:power1"]
    assert meter.power_w() == pytest.approx(3.0)


def test_jetson_ina238_and_legacy_iio_summed(tmp_path: Path) -> None:
    write(tmp_path / "ina238" / "2-0044" / "hwmon" / "hwmon1" / "power1_input", 3_000_000)  # uW
    iio = tmp_path / "ina3221x" / "0-0041" / "iio:device0"
    write(iio / "rail_name_0", "VDD_GPU")
    write(iio / "in_power0_input", 1500)  # mW
    meter = JetsonMeter((str(tmp_path),), start_sampler=False)
    assert sorted(r.label for r in meter.rails) == ["2-0044:power1", "VDD_GPU"]
    assert meter.power_w() == pytest.approx(4.5)
    with pytest.raises(MeterUnavailable):
        JetsonMeter((str(tmp_path / "empty"),), start_sampler=False)


def test_power_integrator_never_goes_backwards_and_keeps_what_it_reported(tmp_path: Path) -> None:
    hw = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    write(hw / "in1_label", "VDD_IN")
    write(hw / "in1_input", 5000)
    write(hw / "curr1_input", 2000)  # 10 W
    clock = FakeClock()
    meter = JetsonMeter((str(tmp_path),), interval_s=0.02, clock=clock, start_sampler=False)
    clock.t += 0.019
    before = meter.read()  # between samples: 10 W x 19 ms
    assert before.joules == pytest.approx(0.19)
    write(hw / "curr1_input", 400)  # power falls to 2 W before the next sample
    clock.t += 0.001
    meter.integrator.sample()
    after = meter.read()
    assert after.joules >= before.joules  # a round between the two reads gets >= 0 J
    assert after.joules == pytest.approx(0.19 + 0.002)  # the read took 10 W to 19 ms; the sample 2 W after
    readings = [after.joules]
    for mw in (2000, 10_000, 0, 10_000, 2000, 0):  # bursts up and down, read every 5 ms
        write(hw / "curr1_input", mw // 5)
        for _ in range(4):
            clock.t += 0.005
            readings.append(meter.joules())
        meter.integrator.sample()
        readings.append(meter.joules())
    assert readings == sorted(readings)
    # Every read samples: each 20 ms burst is charged its own power (2, 10, 0, 10, 2, 0 W), not the
    # one before it, as holding each sample's power until the next did.
    assert readings[-1] == pytest.approx(0.192 + 0.02 * (2 + 10 + 0 + 10 + 2 + 0))
