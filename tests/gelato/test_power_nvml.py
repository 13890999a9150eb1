"""The NVML meter with pynvml patched at the library boundary (energy counter, power between ticks,
resets and outages, init/shutdown balance) and `auto`'s choice of meter: the drafter's GPU, fallbacks
and the warnings that name what goes unmetered."""

from __future__ import annotations

import math
import sys
import types

import pytest

from gelato.power import MeterUnavailable, open_meter
from gelato.power.nvml import NvmlMeter
from tests.gelato.test_power import FakeClock

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
