"""Energy meters: fake sysfs trees and a patched pynvml read by the real meter code."""

from __future__ import annotations

import math
import sys
import time
import types
from pathlib import Path

import psutil
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


def rapl_tree(root: Path, zones: dict[str, tuple[int, int]]) -> None:
    for name, (energy, max_range) in zones.items():
        write(root / name / "energy_uj", energy)
        write(root / name / "max_energy_range_uj", max_range)


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    rapl_tree(tmp_path, {"intel-rapl:0": (900, 1000), "intel-rapl:0:0": (5, 1000), "intel-rapl:1": (10, 10**6)})
    meter = RaplMeter(tmp_path)
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]  # subzone not double counted
    assert meter.joules() == 0.0
    write(tmp_path / "intel-rapl:0" / "energy_uj", 950)
    write(tmp_path / "intel-rapl:1" / "energy_uj", 30)
    assert meter.joules() == pytest.approx(70e-6)
    write(tmp_path / "intel-rapl:0" / "energy_uj", 49)  # wrapped: 950 -> 1000 -> 0 -> 49 = 100 uJ
    assert meter.joules() == pytest.approx(170e-6)
    write(tmp_path / "intel-rapl:0:0" / "energy_uj", 999_999)
    assert meter.joules() == pytest.approx(170e-6)


def test_rapl_missing_or_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MeterUnavailable, match="no RAPL package zones"):
        RaplMeter(tmp_path / "none")
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
    assert meter.joules() == pytest.approx(5.0 + 7.5)  # trapezoids: 5 W for 1 s, 5 -> 10 W over 1 s
    clock.t += 0.5
    assert meter.joules() == pytest.approx(12.5 + 5.0)  # partial interval at the last power


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


# ---- NVML (pynvml patched at the library boundary) -----------------------------------------


class FakeNvml(types.ModuleType):
    NVML_FI_DEV_POWER_INSTANT = 186

    class NVMLError(Exception):
        pass

    def __init__(self, counter: bool = True, present: bool = True) -> None:
        super().__init__("pynvml")
        self.counter_mj = 1_000_000
        self.power_mw = 250_000
        self.has_counter = counter
        self.present = present

    def nvmlInit(self) -> None:
        if not self.present:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        if not self.has_counter:
            raise self.NVMLError("Not Supported")
        return self.counter_mj

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return self.power_mw

    def nvmlDeviceGetFieldValues(self, handle: str, ids: list[int]) -> list[object]:
        value = types.SimpleNamespace(uiVal=self.power_mw)
        return [types.SimpleNamespace(nvmlReturn=0, value=value)]


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


def test_cpu_model_formula_and_psutil_consistency() -> None:
    clock, cpu = FakeClock(), [10.0]
    meter = CpuModelMeter("laptop", clock=clock, cpu_seconds=lambda: cpu[0])
    cpu[0] += 0.5
    clock.t += 2.0
    assert meter.joules() == pytest.approx(0.5 * 6.0 + 2.0 * 3.0)
    assert meter.kind == "estimated" and meter.source == "cpu-model"

    real = CpuModelMeter("phone")
    proc = psutil.Process()
    before, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    used, wall = sum(proc.cpu_times()[:2]) - before, time.monotonic() - t0
    assert used > 0.2
    assert real.joules() == pytest.approx(used * 2.0 + wall * 0.5, rel=0.1)
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


def _unavailable(self: object, *args: object, **kwargs: object) -> None:
    raise MeterUnavailable("absent in this test")


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
