"""Energy meters: fake sysfs trees and a patched pynvml read by the real meter code."""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import pytest

from gelato.device.energy import EnergyAccountant
from gelato.power import CpuModelMeter, MeterUnavailable, NullMeter, open_meter, radio_profile
from gelato.power.jetson import JetsonMeter
from gelato.power.nvml import NvmlMeter
from gelato.power.rapl import RaplMeter
from gelato.power.replay import ReplayMeter
from gelato.types import DraftBlock, Verdict


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


# ---- RAPL ---------------------------------------------------------------------------------


def rapl_tree(root: Path, zones: dict[str, tuple[int, int]], names: dict[str, str] | None = None) -> None:
    """Zones as the kernel writes them; `name` is `package-N` for `intel-rapl:N`, `core` for subzones."""
    for zone, (energy, max_range) in zones.items():
        default = f"package-{zone.split(':')[1]}" if zone.count(":") == 1 else "core"
        write(root / zone / "name", (names or {}).get(zone, default))
        write(root / zone / "energy_uj", energy)
        write(root / zone / "max_energy_range_uj", max_range)


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    rapl_tree(tmp_path, {"intel-rapl:0": (900, 1000), "intel-rapl:0:0": (5, 1000), "intel-rapl:1": (10, 10**6)})
    meter = RaplMeter(tmp_path, clock=FakeClock())  # these tiny ranges wrap in microseconds at real power
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]  # subzone not double counted
    assert meter.joules() == 0.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 950)
    write(tmp_path / "intel-rapl:1" / "energy_uj", 30)
    assert meter.joules() == pytest.approx(70e-6)
    write(tmp_path / "intel-rapl:0" / "energy_uj", 49)  # wrapped: 950 -> 1000 -> 0 -> 49 = 100 uJ
    assert meter.joules() == pytest.approx(170e-6)
    write(tmp_path / "intel-rapl:0:0" / "energy_uj", 999_999)
    assert meter.joules() == pytest.approx(170e-6)


def test_rapl_adds_dram_which_is_outside_the_package(tmp_path: Path) -> None:
    """A server's DRAM domain (subzone `dram`) is not inside its package counter: it is added,
    with its own wraparound; `core` (inside the package) is not; a `dram` alone is no meter."""
    zones = {"intel-rapl:0": (100, 10**6), "intel-rapl:0:0": (50, 1000), "intel-rapl:0:1": (7, 10**6)}
    rapl_tree(tmp_path, zones, names={"intel-rapl:0:0": "dram"})
    meter = RaplMeter(tmp_path, clock=FakeClock())
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:0:0"]
    write(tmp_path / "intel-rapl:0" / "energy_uj", 300)
    write(tmp_path / "intel-rapl:0:0" / "energy_uj", 20)  # wrapped: 50 -> 1000 -> 0 -> 20 = 971 uJ
    write(tmp_path / "intel-rapl:0:1" / "energy_uj", 999)
    assert meter.joules() == pytest.approx((200 + 971) * 1e-6)
    only_dram = tmp_path / "only"
    rapl_tree(only_dram, {"intel-rapl:0:0": (1, 1000)}, names={"intel-rapl:0:0": "dram"})
    with pytest.raises(MeterUnavailable):
        RaplMeter(only_dram, clock=FakeClock())


def test_rapl_read_failing_mid_run_is_nan_then_exact_again(tmp_path: Path) -> None:
    """A counter that cannot be read mid-run (one zone of two) reads NaN and advances no zone: the
    next good read counts everything since the last one (it raised, with the first zone advanced)."""
    rapl_tree(tmp_path, {"intel-rapl:0": (100, 10**6), "intel-rapl:1": (10, 10**6)})
    meter = RaplMeter(tmp_path, clock=FakeClock())
    write(tmp_path / "intel-rapl:0" / "energy_uj", 400)
    (tmp_path / "intel-rapl:1" / "energy_uj").unlink()
    assert math.isnan(meter.joules())
    write(tmp_path / "intel-rapl:0" / "energy_uj", 600)
    write(tmp_path / "intel-rapl:1" / "energy_uj", 30)
    assert meter.joules() == pytest.approx(520e-6)


RANGE_UJ = 262_143_328_850  # max_energy_range_uj of most Intel parts (~262 kJ)


def test_rapl_reset_counter_is_a_new_epoch_not_a_wrap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A counter that goes back because it was reset (driver reload, resume from suspend) is no
    wrap: adding the whole range invented ~62 kJ in one second here. The energy across the reset
    is unknown (a new epoch, `since()` NaN) and exact again after it; a real wrap still counts."""
    import logging

    rapl_tree(tmp_path, {"intel-rapl:0": (200_000_000_000, RANGE_UJ)})
    write(tmp_path / "intel-rapl:0" / "constraint_0_max_power_uw", 125_000_000)  # TDP 125 W: 500 W plausible
    write(tmp_path / "intel-rapl:0" / "constraint_1_max_power_uw", 0)  # no limit stated: ignored
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    before = meter.read()
    clock.t += 1.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 5_000_000)  # reset, then 5 J
    with caplog.at_level(logging.DEBUG, logger="gelato.power.rapl"):
        reset = meter.read()
        assert reset.joules == 0.0 and math.isnan(reset.since(before))  # not 62 kJ
        clock.t += 1.0
        write(tmp_path / "intel-rapl:0" / "energy_uj", 35_000_000)
        after = meter.read()
        assert after.since(reset) == pytest.approx(30.0)  # exact again from the reset on
        write(tmp_path / "intel-rapl:0" / "energy_uj", 1_000_000)  # a second reset: said at DEBUG only
        clock.t += 1.0
        assert math.isnan(meter.read().since(after))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "a reset" in warned[0].getMessage() and "intel-rapl:0" in warned[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "a reset" in r.getMessage() for r in caplog.records)
    assert meter.max_power_w == [500.0]
    write(tmp_path / "intel-rapl:0" / "energy_uj", RANGE_UJ - 40_000_000)
    meter = RaplMeter(tmp_path, clock=clock)
    top = meter.read()
    write(tmp_path / "intel-rapl:0" / "energy_uj", 60_000_000)  # a real wrap: 100 J in 1 s
    clock.t += 1.0
    assert meter.read().since(top) == pytest.approx(100.0 + 1e-6)  # the counter counts 0 after the range


def test_rapl_reads_too_far_apart_may_hide_wraps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Reads further apart than half a wrap period at the plausible peak power may hide whole
    wraps (a counter that wrapped once and went past its old value looks like a small step): the
    energy across such a gap is unknown (NaN), not the small step. The period follows the zone's
    stated limits (4x), else 1000 W."""
    import logging

    rapl_tree(tmp_path, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)  # no stated limit: 1000 W, a wrap in 262 s
    start = meter.read()
    clock.t += 120.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 11_000_000)
    within = meter.read()
    assert within.since(start) == pytest.approx(10.0)  # 120 s apart: fine
    clock.t += 200.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 21_000_000)  # 10 J more, or 10 J + one whole wrap?
    with caplog.at_level(logging.WARNING, logger="gelato.power.rapl"):
        gap = meter.read()
    assert math.isnan(gap.since(within)) and math.isnan(gap.since(start))
    assert "cannot wrap unseen" in caplog.text
    clock.t += 1.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 22_000_000)
    assert meter.read().since(gap) == pytest.approx(1.0)  # exact again after it
    assert meter.max_gap_s == pytest.approx(RANGE_UJ / 1e6 / 1000 / 2, rel=1e-6)
    limited = tmp_path / "limited"
    rapl_tree(limited, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    write(limited / "intel-rapl:0" / "constraint_0_max_power_uw", 15_000_000)  # a 15 W laptop part
    write(limited / "intel-rapl:0" / "constraint_1_max_power_uw", 55_000_000)  # PL2 55 W: 220 W plausible
    meter = RaplMeter(limited, clock=clock)
    start = meter.read()
    clock.t += 200.0
    write(limited / "intel-rapl:0" / "energy_uj", 11_000_000)
    assert meter.read().since(start) == pytest.approx(10.0)  # 200 s is well within a wrap at 220 W


def test_rapl_keeper_reads_between_callers_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real clock a keeper thread reads the counters on its own (a caller reading seldom,
    a long probe window, must not hide a wrap), and `close()` stops it."""
    import time

    import gelato.power.rapl as rapl

    monkeypatch.setattr(rapl, "KEEP_MIN_S", 0.01)
    monkeypatch.setattr(rapl, "KEEP_MAX_S", 0.02)
    monkeypatch.setattr(rapl, "COUNTING_PROBE_S", 0)  # a static tree: not the frozen-counter check
    rapl_tree(tmp_path, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    meter = RaplMeter(tmp_path)
    try:
        start = meter.read()
        write(tmp_path / "intel-rapl:0" / "energy_uj", 3_000_000)
        deadline = time.monotonic() + 5.0
        while meter._last != [3_000_000] and time.monotonic() < deadline:  # no caller reads meanwhile
            time.sleep(0.01)
        assert meter._last == [3_000_000]
        assert meter.read().since(start) == pytest.approx(2.0)  # counted once, by whichever read saw it
    finally:
        meter.close()
    assert meter._keeper is not None and not meter._keeper.is_alive()
    assert RaplMeter(tmp_path, clock=FakeClock())._keeper is None  # a fake clock: reads only when asked


def test_rapl_counts_package_zones_only_not_psys(tmp_path: Path) -> None:
    # A laptop: psys (the whole platform) already contains package-0, so adding it double counts.
    zones = {"intel-rapl:0": (1_000_000, 10**9), "intel-rapl:1": (1_000_000, 10**9)}
    rapl_tree(tmp_path, zones, names={"intel-rapl:1": "psys"})
    meter = RaplMeter(tmp_path, clock=FakeClock())
    assert [z.name for z in meter.zones] == ["intel-rapl:0"]
    write(tmp_path / "intel-rapl:0" / "energy_uj", 2_000_000)  # 1 J in the package
    write(tmp_path / "intel-rapl:1" / "energy_uj", 2_500_000)  # 1.5 J on the platform, that 1 J included
    assert meter.joules() == pytest.approx(1.0)
    # Multi-die parts name their top-level zones package-P-die-D. Intel's count each die apart:
    # each is counted once.
    dies = tmp_path / "dies"
    die_names = {"intel-rapl:0": "package-0-die-0", "intel-rapl:1": "package-0-die-1"}
    rapl_tree(dies, {"intel-rapl:0": (1_000_000, 10**9), "intel-rapl:1": (3_000_017, 10**9)}, names=die_names)
    assert [z.name for z in RaplMeter(dies, clock=FakeClock()).zones] == ["intel-rapl:0", "intel-rapl:1"]
    # Multi-die AMD parts: every die zone reads the one socket counter, the same value at the same
    # time: counted once (summed, a 60 W package read 120 W).
    mirrored = tmp_path / "mirrored"
    mirrored_zones = {"intel-rapl:0": (5_000_000, 10**9), "intel-rapl:1": (5_000_000, 10**9)}
    mirrored_zones |= {"intel-rapl:0:0": (7, 10**9), "intel-rapl:1:0": (7, 10**9)}  # and their dram, mirrored
    dram = {"intel-rapl:0:0": "dram", "intel-rapl:1:0": "dram"}
    rapl_tree(mirrored, mirrored_zones, names=die_names | dram)
    meter = RaplMeter(mirrored, clock=FakeClock())
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:0:0"]
    for zone in ("intel-rapl:0", "intel-rapl:1"):
        write(mirrored / zone / "energy_uj", 65_000_000)
    assert meter.joules() == pytest.approx(60.0)
    only_psys = tmp_path / "psys"
    rapl_tree(only_psys, {"intel-rapl:0": (1, 1000)}, names={"intel-rapl:0": "psys"})
    with pytest.raises(MeterUnavailable, match="no RAPL package zones"):
        RaplMeter(only_psys)


def test_rapl_counters_that_do_not_move_are_no_meter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package never draws 0 W: counters frozen at the meter's start (some VMs expose such) would
    read 0 J as measured; the meter refuses them, so `auto` moves on to an estimate. Counters
    that move (a real package, ~every ms) pass."""
    import threading

    import gelato.power.rapl as rapl

    monkeypatch.setattr(rapl, "COUNTING_PROBE_S", 0.05)
    rapl_tree(tmp_path, {"intel-rapl:0": (1_000_000, RANGE_UJ)})
    with pytest.raises(MeterUnavailable, match=r"did not move in 0.05 s: frozen"):
        RaplMeter(tmp_path)
    monkeypatch.setattr(rapl, "COUNTING_PROBE_S", 5.0)
    moved = threading.Timer(0.02, write, (tmp_path / "intel-rapl:0" / "energy_uj", 1_000_500))
    moved.start()
    meter = RaplMeter(tmp_path)
    moved.join()
    try:
        assert meter._last == [1_000_500]  # counting from the counter as the check left it
        write(tmp_path / "intel-rapl:0" / "energy_uj", 1_500_500)
        assert meter.joules() == pytest.approx(0.5)
    finally:
        meter.close()


def test_rapl_missing_or_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MeterUnavailable, match="no RAPL package zones"):
        RaplMeter(tmp_path / "none")
    # A zone stating no range (some older systems): no wrap could be told from a reset, and every
    # read was a new epoch (NaN energy for the whole run under a "measured" label).
    rangeless = tmp_path / "rangeless"
    rapl_tree(rangeless, {"intel-rapl:0": (1, 0)})
    with pytest.raises(MeterUnavailable, match=r"intel-rapl:0 .* no max_energy_range_uj"):
        RaplMeter(rangeless)
    rapl_tree(tmp_path, {"intel-rapl:0": (1, 1000)})

    def denied(zone: Path) -> int:
        raise PermissionError(13, "Permission denied", str(zone / "energy_uj"))

    monkeypatch.setattr(RaplMeter, "_counter", staticmethod(denied))
    with pytest.raises(MeterUnavailable, match="root-only"):
        RaplMeter(tmp_path)


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


def test_after_an_outage_the_energy_is_known_again_from_a_new_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A power sensor out for longer than `FAILED_READS_S`, then back (an NVML GPU without the
    energy counter, which integrates power as the Jetson meter does): energy across the outage is
    unknown, energy between readings after it is exact again (once every later reading was NaN:
    a 1.5 s glitch left the rest of a long run unmeasured and the budget unenforced)."""
    from gelato.power.base import FAILED_READS_S

    fake = FakeNvml(counter=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = FakeClock()
    meter = NvmlMeter(clock=clock)
    assert meter.integrator is not None
    meter.integrator.stop()  # sampled by hand below
    before = meter.read()
    fake.has_power = False
    for _ in range(int(FAILED_READS_S / 0.1) + 5):  # out for 1.5 s
        clock.t += 0.1
        meter.integrator.sample()
    during = meter.read()
    assert math.isnan(during.since(before))
    fake.has_power = True
    clock.t += 0.1
    meter.integrator.sample()  # back
    after = meter.read()
    for _ in range(10):
        clock.t += 0.1
        meter.integrator.sample()
    later = meter.read()
    assert later.since(after) == pytest.approx(250.0 * 1.0)  # exact again within the new epoch
    assert math.isnan(later.since(before)) and math.isnan(later.since(during))  # across the outage: unknown


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


# ---- NVML (pynvml patched at the library boundary) -----------------------------------------


class FakeNvml(types.ModuleType):
    NVML_FI_DEV_POWER_INSTANT = 186

    class NVMLError(Exception):
        pass

    def __init__(self, counter: bool = True, present: bool = True, power: bool = True) -> None:
        super().__init__("pynvml")
        self.counter_mj = 1_000_000
        self.power_mw = 250_000
        self.has_counter = counter
        self.present = present
        self.has_power = power

    def nvmlInit(self) -> None:
        if not self.present:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return f"uuid:{uuid}"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        if not self.has_counter:
            raise self.NVMLError("Not Supported")
        return self.counter_mj

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        if not self.has_power:
            raise self.NVMLError("Not Supported")
        return self.power_mw

    def nvmlDeviceGetFieldValues(self, handle: str, ids: list[int]) -> list[object]:
        if not self.has_power:
            raise self.NVMLError("Not Supported")
        value = types.SimpleNamespace(uiVal=self.power_mw)
        return [types.SimpleNamespace(nvmlReturn=0, value=value)]


class CountingNvml(FakeNvml):
    """Counts NVML's inits and shutdowns (NVML keeps a count: each init needs its shutdown)."""

    def __init__(self, **kw: bool) -> None:
        super().__init__(**kw)
        self.inits = self.shutdowns = 0
        self.bad_uuid = False

    def nvmlInit(self) -> None:
        super().nvmlInit()
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if self.bad_uuid:
            raise self.NVMLError("Not Found")
        return super().nvmlDeviceGetHandleByUUID(uuid)


def test_nvml_inits_and_shutdowns_balance(monkeypatch: pytest.MonkeyPatch) -> None:
    """A meter that cannot be made (no such GPU; no counter and no power) gives back NVML's init,
    and a meter closed twice shuts NVML down once: a second shutdown would end another meter's."""
    fake = CountingNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    fake.bad_uuid = True
    with pytest.raises(MeterUnavailable, match="Not Found"):
        NvmlMeter(uuid="GPU-0")
    assert (fake.inits, fake.shutdowns) == (1, 1)
    fake.bad_uuid, fake.has_counter, fake.has_power = False, False, False
    with pytest.raises(MeterUnavailable, match="no energy counter and no power"):
        NvmlMeter(clock=FakeClock())
    assert (fake.inits, fake.shutdowns) == (2, 2)
    fake.has_counter = True
    meter = NvmlMeter(clock=FakeClock())
    meter.close()
    meter.close()
    assert (fake.inits, fake.shutdowns) == (3, 3)


def test_nvml_counter_delta_with_instant_power_between_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = FakeClock()
    meter = NvmlMeter(clock=clock)
    assert meter.joules() == 0.0
    clock.t += 0.01  # counter has not ticked yet: 250 W x 10 ms
    assert meter.joules() == pytest.approx(2.5)
    fake.counter_mj += 2000  # tick: 2 J counted by the driver
    assert meter.joules() == pytest.approx(2.5)  # never goes backwards
    fake.counter_mj += 3000
    clock.t += 0.02
    assert meter.joules() == pytest.approx(5.0)
    # Two threads' reads can arrive out of their clocks' order: an interval is counted once.
    t = clock.t
    assert meter.joules_at(t + 0.2) == pytest.approx(5.0 + 250 * 0.2)
    assert meter.joules_at(t + 0.1) == pytest.approx(55.0)
    assert meter.joules_at(t + 0.3) == pytest.approx(5.0 + 250 * 0.3)  # it read 80 J, 25 J twice
    meter.close()


def test_nvml_read_failing_mid_run_is_nan_then_exact_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A counter read failing mid-run (GPU lost, driver error) reads NaN instead of raising out of
    the device's round loop; a power read failing between ticks leaves the counter's value."""
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = FakeClock()
    meter = NvmlMeter(clock=clock)
    fake.has_counter = False
    clock.t += 0.01
    assert math.isnan(meter.joules())
    fake.has_counter, fake.has_power = True, False
    fake.counter_mj += 4000
    assert meter.joules() == pytest.approx(4.0)
    clock.t += 0.01  # no tick and no power: the counter's value, never less than reported
    assert meter.joules() == pytest.approx(4.0)
    meter.close()


def test_nvml_without_counter_integrates_power(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(counter=False))
    clock = FakeClock()
    meter = NvmlMeter(clock=clock)
    assert meter.integrator is not None
    meter.integrator.stop()
    clock.t += 2.0
    meter.integrator.sample()
    assert meter.joules() == pytest.approx(500.0)


def test_nvml_with_neither_counter_nor_power_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU that reports no energy and no power (older or virtual parts): the NVML meter is
    unavailable, so `auto` goes on to the next meter (it raised NVML's own error through `auto`
    and the device CLI, a traceback instead of a fallback)."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(counter=False, power=False))
    with pytest.raises(MeterUnavailable, match="no energy counter and no power reading"):
        NvmlMeter()
    monkeypatch.setattr("gelato.power.rapl.RaplMeter.__init__", _unavailable)
    monkeypatch.setattr("gelato.power.jetson.JetsonMeter.__init__", _unavailable)
    assert open_meter("auto").source == "cpu-model"


def test_nvml_absent_is_unavailable_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(present=False))
    with pytest.raises(MeterUnavailable, match="NVML"):
        NvmlMeter()
    with pytest.raises(MeterUnavailable):
        open_meter("nvml")


# ---- replay, cpu-model, auto, NaN -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_replay_meter(tmp_path: Path, fmt: str) -> None:
    samples = [(0.0, 2.0), (1.0, 4.0), (3.0, 4.0)]
    path = tmp_path / f"trace.{fmt}"
    if fmt == "csv":
        path.write_text("t_s,power_w\n" + "".join(f"{t},{p}\n" for t, p in samples))
    else:
        path.write_text("".join(f'{{"t_s": {t}, "power_w": {p}}}\n' for t, p in samples))
    clock = FakeClock()
    meter = ReplayMeter(path, clock=clock)
    assert meter.joules() == 0.0
    clock.t += 0.5
    assert meter.joules() == pytest.approx(0.5 * (2.0 + 3.0) / 2)
    clock.t += 2.5
    assert meter.joules() == pytest.approx(3.0 + 8.0)
    clock.t += 1.0  # past the end: holds the last power
    assert meter.joules() == pytest.approx(15.0)
    path.write_text("t_s,power_w\n1,2\n")
    with pytest.raises(MeterUnavailable, match=">= 2 samples"):
        ReplayMeter(path)


def test_replay_trace_blank_lines_and_bad_samples(tmp_path: Path) -> None:
    """A blank line is no sample (a JSONL trace with one raised JSONDecodeError); a sample that is
    not two finite numbers is refused naming the trace (a NaN t_s passed the increasing check
    and every reading was NaN; a missing key or a word raised a bare KeyError/ValueError)."""
    path = tmp_path / "trace.jsonl"
    path.write_text('{"t_s": 0, "power_w": 2}\n\n{"t_s": 1, "power_w": 4}\n\n')
    assert ReplayMeter(path).trace == [(0.0, 2.0), (1.0, 4.0)]
    for text, needle in [
        ('{"t_s": 0, "power_w": 2}\n{"t_s": NaN, "power_w": 4}\n{"t_s": 2, "power_w": 4}\n', "finite"),
        ("t_s,power_w\n0,2\nnan,3\n2,4\n", "finite"),
        ('{"t_s": 0, "power_w": 2}\n{"t": 1, "power_w": 4}\n', "needs numbers t_s and power_w"),
        ("t_s,power_w\n0,2\n1,lots\n", "needs numbers t_s and power_w"),
    ]:
        path.write_text(text)
        with pytest.raises(MeterUnavailable, match=needle):
            ReplayMeter(path)


def test_replay_trace_declares_its_kind(tmp_path: Path) -> None:
    """A trace says whether a real meter recorded it (`kind` column or key); one that does not is
    `estimated`, so `--meter replay:FILE` on a made-up trace no longer reports measured energy.
    Mixed or unknown kinds are refused naming the file; an explicit `kind=` wins."""
    csv_path, jsonl_path = tmp_path / "trace.csv", tmp_path / "trace.jsonl"

    def jsonl(*kinds: str | None) -> str:  # one sample per kind, None: no key
        rows = [{"t_s": t, "power_w": 2 + 2 * t} | ({"kind": k} if k else {}) for t, k in enumerate(kinds)]
        return "".join(json.dumps(row) + "\n" for row in rows)

    csv_path.write_text("t_s,power_w\n0,2\n1,4\n")
    assert ReplayMeter(csv_path).kind == "estimated"
    assert open_meter(f"replay:{csv_path}").read().kind == "estimated"
    assert ReplayMeter(csv_path, kind="measured").kind == "measured"
    csv_path.write_text("t_s,power_w,kind\n0,2,measured\n1,4,measured\n")
    assert open_meter(f"replay:{csv_path}").read().kind == "measured"
    assert ReplayMeter(csv_path, kind="estimated").kind == "estimated"
    jsonl_path.write_text(jsonl("estimated", "estimated"))
    assert ReplayMeter(jsonl_path).kind == "estimated"
    jsonl_path.write_text(jsonl("measured", "measured"))
    assert ReplayMeter(jsonl_path).kind == "measured"
    for path, text, needle in [
        (csv_path, "t_s,power_w,kind\n0,2,measured\n1,4,estimated\n", "same on every sample"),
        (csv_path, "t_s,power_w,kind\n0,2,measured\n1,4,\n", "same on every sample"),
        (jsonl_path, jsonl("measured", None), "same on every sample"),
        (csv_path, "t_s,power_w,kind\n0,2,guessed\n1,4,guessed\n", "one of measured, estimated"),
        (jsonl_path, jsonl("unavailable", "unavailable"), "one of measured, estimated"),
    ]:
        path.write_text(text)
        with pytest.raises(MeterUnavailable, match=needle) as err:
            ReplayMeter(path, kind="measured")  # a malformed trace is refused whatever the caller says
        assert str(path) in str(err.value)


def test_cpu_model_formula_and_psutil_consistency() -> None:
    clock, cpu = FakeClock(), [10.0]
    meter = CpuModelMeter("laptop", clock=clock, cpu_seconds=lambda: cpu[0])
    cpu[0] += 0.5
    clock.t += 2.0
    assert meter.joules() == pytest.approx(0.5 * 6.0 + 2.0 * 3.0)
    assert meter.kind == "estimated" and meter.source == "cpu-model"

    # The real meter in a process of its own: it counts the CPU time of every thread of its process,
    # and threads that earlier tests leave in pytest's process can burn enough of the sleep's wall
    # time to leave too little time without CPU time for the check to mean anything.
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import json, time
        import psutil
        from gelato.power import CpuModelMeter

        reads = []  # the meter's clock reads: the first is its start

        def clock():
            reads.append(time.monotonic())
            return reads[-1]

        real = CpuModelMeter("phone", clock=clock)
        proc = psutil.Process()
        before = sum(proc.cpu_times()[:2])
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        time.sleep(0.3)  # wall time without CPU time: a meter counting wall time as CPU time fails below
        used = sum(proc.cpu_times()[:2]) - before
        reading = real.read()  # its wall time from the meter's own clock: a stall before it changes both
        print(json.dumps({"used": used, "wall": reading.t_s - reads[0], "joules": reading.joules}))
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    used, wall = got["used"], got["wall"]
    assert used > 0.2 and wall > used + 0.25, got
    assert got["joules"] == pytest.approx(used * 2.0 + wall * 0.5, rel=0.1), got
    with pytest.raises(ValueError, match="unknown device profile"):
        CpuModelMeter("toaster")


def test_auto_falls_back_to_labelled_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(present=False))
    monkeypatch.setattr("gelato.power.rapl.RaplMeter.__init__", _unavailable)
    monkeypatch.setattr("gelato.power.jetson.JetsonMeter.__init__", _unavailable)
    meter = open_meter("auto", "jetson-orin-nano")
    assert meter.source == "cpu-model" and meter.kind == "estimated"
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert open_meter("auto").source == "nvml"


def test_auto_reads_the_gpu_the_drafter_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the drafter's --device, NVML reads that GPU (by UUID: NVML's order is not torch's),
    and `auto` passes NVML over for a drafter on the CPU (it read GPU 0 whatever --device said: a
    laptop's idle GPU taken for the drafter's energy)."""
    import torch

    from gelato.device.cli import open_accountant
    from gelato.device.config import DeviceConfig

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setattr("gelato.power.rapl.RaplMeter.__init__", _unavailable)
    monkeypatch.setattr("gelato.power.jetson.JetsonMeter.__init__", _unavailable)
    asked: list[int] = []

    def properties(index: int) -> types.SimpleNamespace:
        asked.append(index)
        return types.SimpleNamespace(uuid=f"uuid-of-{index}")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert open_meter("auto", device="cpu").source == "cpu-model"
    assert open_meter("auto", device="auto").source == "cpu-model"  # torch sees no CUDA: a CPU drafter
    assert open_accountant(DeviceConfig(prompt=["x"], device="cpu")).meter.source == "cpu-model"
    explicit = open_meter("nvml", device="cpu")  # asked for by name: GPU 0
    assert isinstance(explicit, NvmlMeter) and explicit.handle == "gpu0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    meter = open_meter("auto", device="cuda:1")
    assert isinstance(meter, NvmlMeter) and meter.handle == "uuid:GPU-uuid-of-1" and asked[-1] == 1
    meter = open_accountant(DeviceConfig(prompt=["x"], device="auto")).meter
    assert isinstance(meter, NvmlMeter) and meter.handle == "uuid:GPU-uuid-of-0"

    def no_such_gpu(index: int) -> types.SimpleNamespace:
        raise AssertionError("Invalid device id")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_such_gpu)  # --device cuda:5 on one GPU
    assert open_meter("auto", device="cuda:5").source == "cpu-model"  # loading the drafter will say why


def _unavailable(self: object, *args: object, **kwargs: object) -> None:
    raise MeterUnavailable("absent in this test")


def test_auto_says_when_the_drafters_gpu_goes_unmetered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A CUDA drafter whose GPU NVML cannot read (a container without libnvidia-ml): `auto` falls
    back to RAPL, which sees the CPU only, with a warning naming NVML's reason (it did so
    silently, the records saying `rapl (measured)`); the estimate's fallback says why, with a
    warning when that GPU is then unmetered, at INFO for a CPU drafter."""
    import logging

    import torch

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(present=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid="u"))
    monkeypatch.setattr("gelato.power.rapl.RaplMeter.__init__", lambda self: None)
    monkeypatch.setattr("gelato.power.jetson.JetsonMeter.__init__", _unavailable)
    with caplog.at_level(logging.INFO, logger="gelato.power"):
        assert open_meter("auto", device="cuda:0").source == "rapl"
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "the drafter runs on cuda:0 but NVML cannot read it" in warned[0].getMessage()
        assert "rapl meters the host without that GPU" in warned[0].getMessage()
        caplog.clear()
        monkeypatch.setattr("gelato.power.rapl.RaplMeter.__init__", _unavailable)
        # A Jetson: its integrated GPU is on the board rails the jetson meter reads; no warning.
        monkeypatch.setattr("gelato.power.jetson.JetsonMeter.__init__", lambda self, *a, **k: None)
        assert open_meter("auto", device="cuda:0").source == "jetson"
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        monkeypatch.setattr("gelato.power.jetson.JetsonMeter.__init__", _unavailable)
        assert open_meter("auto", device="cuda:0").source == "cpu-model"
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        # The GPU doing the drafting is outside the estimate: a warning, not INFO.
        assert len(warned) == 1 and "the drafter runs on cuda:0 but no meter reads here" in warned[0]
        assert "rapl: absent in this test" in warned[0] and "CPU time only, without that GPU" in warned[0]
        caplog.clear()
        assert open_meter("auto", device="cpu").source == "cpu-model"  # a CPU drafter: INFO is enough
        said = [r for r in caplog.records if "no power meter reads here" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.INFO


def test_null_meter_propagates_nan() -> None:
    acct = EnergyAccountant(NullMeter(), radio_profile("wifi"))
    start = acct.round_start()
    tele = acct.round_end(start, DraftBlock(round=0, ids=(1, 2)), Verdict(0, 1, 5), 2, 100, 50)
    assert math.isnan(tele.e_compute_j) and math.isnan(tele.e_j)
    assert tele.e_radio_j > 0 and tele.energy_kind == "unavailable"


def test_radio_model_matches_reference_constants() -> None:
    lte = radio_profile("lte")
    assert lte is not None
    # 125 000 bytes = 1 Mbit up at 10 Mbit/s: 0.1 s at (438.39*10 + 1288.04) mW
    assert lte.round_energy_j(125_000, 0) == pytest.approx(0.1 * 5.67194)
    wifi = radio_profile("wifi")
    assert wifi is not None
    # 1 Mbit down at 50 Mbit/s: 0.02 s at (137.01*50 + 132.86) mW
    assert wifi.round_energy_j(0, 125_000) == pytest.approx(0.02 * 6.98336)
    assert radio_profile("none") is None
    with pytest.raises(ValueError, match="unknown radio"):
        radio_profile("carrier-pigeon")


def test_nvml_between_ticks_charges_each_phase_its_own_power(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds far shorter than the counter's 100 ms tick: 10 ms of drafting at 300 W, then 40 ms
    of waiting at 100 W, read at each phase's end (the power then is that phase's). Each phase
    gets its own power: extrapolating from the last tick charged a whole tick interval at the
    power read now (drafting seen at ~600 W, most waiting phases at 0 J)."""
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = FakeClock()
    meter = NvmlMeter(clock=clock)
    true_j, next_tick, step = 0.0, clock.t + 0.1, 0.0005

    def run(seconds: float, watts: float) -> None:
        nonlocal true_j, next_tick
        for _ in range(round(seconds / step)):
            clock.t += step
            true_j += watts * step
            if clock.t >= next_tick - 1e-12:  # the driver's counter ticks
                fake.counter_mj, next_tick = 1_000_000 + int(true_j * 1000), next_tick + 0.1
        fake.power_mw = int(watts * 1000)

    draft_j = wait_j = 0.0
    zero_waits = 0
    for _ in range(200):
        start = meter.read()
        run(0.010, 300.0)
        drafted = meter.read()
        run(0.040, 100.0)
        end = meter.read()
        draft_j, wait_j = draft_j + drafted.since(start), wait_j + end.since(drafted)
        zero_waits += end.since(drafted) == 0.0
    assert draft_j / (200 * 0.010) == pytest.approx(300.0, rel=0.1)
    assert wait_j / (200 * 0.040) == pytest.approx(100.0, rel=0.1)
    assert zero_waits < 10
    assert (draft_j + wait_j) == pytest.approx(true_j, rel=0.02)  # the ticks keep the total exact
    meter.close()


def test_nvml_counter_that_goes_back_starts_a_new_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU or driver reset sets the energy counter back: the energy across it is unknown (NaN),
    not rounds read as 0 J until the counter climbs back to what the meter had reported."""
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = FakeClock()
    meter = NvmlMeter(clock=clock)
    fake.counter_mj += 5000
    before = meter.read()
    assert before.joules == pytest.approx(5.0) and before.epoch == 0
    fake.counter_mj = 100  # reset
    clock.t += 0.01
    after = meter.read()
    assert after.epoch == 1 and math.isnan(after.since(before))
    fake.counter_mj += 2000
    clock.t += 0.01
    assert meter.read().since(after) == pytest.approx(2.0)  # exact again within the new epoch
    meter.close()
