"""The GPU-run tools, on the CPU: the NVML check's arithmetic through the real `NvmlMeter` over a
pynvml patched at the library boundary, and a Qwen2.5-shaped checkpoint loading through the same
path as real ones and verifying a block."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path

import pytest

from gelato.benchmarks import nvml_check
from gelato.benchmarks.qwen_shapes import SHAPES, build, parameters
from gelato.edge.sessions import TargetSession
from gelato.models import load_model
from gelato.power.nvml import NvmlMeter
from gelato.types import DraftBlock, SamplingParams


class ClockedNvml(types.ModuleType):
    """An NVML whose energy counter advances in real time at `counter_w`, ticking every 50 ms, and
    whose instantaneous power reads `power_w`."""

    NVML_FI_DEV_POWER_INSTANT = 186

    class NVMLError(Exception):
        pass

    def __init__(self, counter_w: float, power_w: float) -> None:
        super().__init__("pynvml")
        self.counter_w, self.power_w, self.t0 = counter_w, power_w, time.monotonic()

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "Clocked fake"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        ticks = int((time.monotonic() - self.t0) / 0.05)
        return int(ticks * 0.05 * self.counter_w * 1e3)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return int(self.power_w * 1e3)

    def nvmlDeviceGetFieldValues(self, handle: str, ids: list[int]) -> list[object]:
        return [types.SimpleNamespace(nvmlReturn=0, value=types.SimpleNamespace(uiVal=int(self.power_w * 1e3)))]


def idle_load(stop: threading.Event) -> None:
    stop.wait()


@pytest.mark.parametrize(("counter_w", "agrees"), [(300.0, True), (150.0, False)])
def test_nvml_check_compares_counter_with_sampled_power(
    monkeypatch: pytest.MonkeyPatch, counter_w: float, agrees: bool
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", ClockedNvml(counter_w, 300.0))
    meter = NvmlMeter()
    report = nvml_check.check(meter, idle_load, seconds=0.6, warmup_s=0.1)
    meter.close()
    for name in ("idle", "load"):
        w = report[name]
        assert w["sampled_mean_w"] == 300.0 and w["power_samples"] > 10
        # Ticks are seen by a thread polling every 10 ms, so each period is off by up to a poll or so,
        # more when a busy machine wakes that thread late: ±25 ms. A wrong estimate is further off: a
        # "tick" at every poll reads ~10 ms, every other tick missed ~100 ms.
        assert w["counter_tick_ms_median"] == pytest.approx(50, abs=25)
        # Ticks quantize the counter: the extrapolation keeps the error within one tick's energy.
        assert (abs(w["ratio"] - 1) <= 0.10) == agrees, w


def test_nvml_check_without_gpu_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: no NVML library
    out = tmp_path / "r.json"
    assert nvml_check.main(["--seconds", "0.1", "--out", str(out)]) == 2
    assert not out.exists()


def test_qwen_shaped_checkpoint_loads_and_verifies(tmp_path: Path) -> None:
    shape = SHAPES["0.5b"]
    assert round(parameters(shape) / 1e9, 2) == 0.49 and round(parameters(SHAPES["7b"]) / 1e9, 2) == 7.62
    path = build("0.5b", tmp_path / "q", dtype="bfloat16", layers=1)
    loaded = load_model(str(path), "target", "auto", "cpu")
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size, cfg.num_hidden_layers) == (896, 2, 151936, 1)
    assert loaded.vocab_size == 4096 and loaded.dtype.is_floating_point
    drafter_side = load_model(None, "drafter", "float32", "cpu")  # the built-in drafter
    assert drafter_side.fingerprint == loaded.fingerprint  # shares the tokenizer: pairs up
    session = TargetSession("q", loaded, SamplingParams(), [5, 6, 7])
    session.prefill()
    a, nxt = session.verify(DraftBlock(round=0, ids=(8, 9)))
    assert 0 <= a <= 2 and 0 <= nxt < 4096 and session.length == 3 + a + 1
