"""NVIDIA GPU energy through NVML.

Contract: `NvmlMeter(index)` (or `NvmlMeter(uuid=...)`: a GPU by its UUID) reads
`nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load, Volta+) as a counter delta. The counter
only moves every ~20–100 ms, so between its ticks the meter adds, at each read, instantaneous power
(`NVML_FI_DEV_POWER_INSTANT`, else `nvmlDeviceGetPowerUsage`) × the time since the previous read
(so a round's drafting and waiting phases each get the power read at their end), starts again from
the counter at each tick, and never reports less than it already did. A counter read that fails
mid-run (a driver error, a GPU fallen off the bus) reads NaN — that reading is unknown — and changes
nothing, so the next good read is exact again (the counter kept counting); a power read that fails
between ticks adds nothing. A counter that goes back (a GPU or driver reset) starts a new epoch
(`Reading.epoch`: energy across it is NaN), with a warning. GPUs without the counter fall back to
integrating power as the Jetson meter does (sampled on a thread and at every read). No NVML
library, no GPU: `MeterUnavailable`. `pynvml` is imported lazily, so tests can patch it at the library boundary.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from gelato.power.base import Meter, MeterUnavailable, PowerIntegrator

log = logging.getLogger(__name__)


def _nvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise MeterUnavailable("pynvml (nvidia-ml-py) is not installed") from exc


class NvmlMeter(Meter):
    source = "nvml"
    kind = "measured"

    def __init__(
        self,
        index: int = 0,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 0.02,
        uuid: str | None = None,
    ) -> None:
        """`uuid` (`GPU-...`, `gelato.power.cuda_uuid`): that GPU; else NVML's GPU `index`."""
        super().__init__(clock)
        nv = self.nv = _nvml()
        self._closed = False
        self._lock = threading.Lock()
        self.integrator: PowerIntegrator | None = None
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise MeterUnavailable(f"NVML: {exc}") from exc
        try:
            self._open(index, uuid, interval_s, clock)
        except BaseException:
            # NVML counts its inits: a meter that is not made must not hold one (`auto` probes
            # meters in turn, and a later shutdown would not balance it).
            with contextlib.suppress(Exception):
                nv.nvmlShutdown()
            raise

    def _open(self, index: int, uuid: str | None, interval_s: float, clock: Callable[[], float]) -> None:
        nv = self.nv
        try:
            self.handle = nv.nvmlDeviceGetHandleByUUID(uuid) if uuid else nv.nvmlDeviceGetHandleByIndex(index)
            self.name = nv.nvmlDeviceGetName(self.handle)
        except nv.NVMLError as exc:
            raise MeterUnavailable(f"NVML: {exc}") from exc
        try:
            self._c0 = self._counter_mj()
        except nv.NVMLError:  # pre-Volta: no energy counter, integrate power instead
            try:
                self.integrator = PowerIntegrator(self.power_w, interval_s, clock)
            except nv.NVMLError as exc:  # no power reading either: `auto` goes on to the next meter
                raise MeterUnavailable(f"NVML: no energy counter and no power reading ({exc})") from exc
            self.integrator.start()
            return
        self._last_c = self._c0
        self._epoch = 0  # one more each time the counter goes back (a reset)
        self._last_read_t = clock()
        self._estimate_j = 0.0  # the counter at its last tick + power × time over each read since
        self._reported_j = 0.0

    def _counter_mj(self) -> int:
        return int(self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def power_w(self) -> float:
        """Instantaneous power if the driver offers it, else the (1-s averaged on Ampere+) usage."""
        nv = self.nv
        try:
            fid = getattr(nv, "NVML_FI_DEV_POWER_INSTANT", None)
            if fid is not None:
                (value,) = nv.nvmlDeviceGetFieldValues(self.handle, [fid])
                if value.nvmlReturn == 0:
                    return float(value.value.uiVal) / 1e3
        except nv.NVMLError:
            pass
        return float(nv.nvmlDeviceGetPowerUsage(self.handle)) / 1e3

    def joules_epoch_at(self, now: float) -> tuple[float, int]:
        if self.integrator is not None:
            return self.integrator.joules_epoch(now)
        with self._lock:
            return self._joules(now), self._epoch

    def joules_at(self, now: float) -> float:
        return self.joules_epoch_at(now)[0]

    def _joules(self, now: float) -> float:
        try:
            c = self._counter_mj()
        except self.nv.NVMLError:  # unknown now; the counter goes on, so the next read is exact
            return math.nan
        if c < self._last_c:
            # The counter went back (a GPU or driver reset): the energy since the last read is
            # unknown. A new epoch from 0 J (`since()` across it is NaN), not rounds read as 0 J
            # until the counter climbed back to what was reported.
            log.warning("NVML energy counter went back (%d -> %d mJ): counting from a new epoch", self._last_c, c)
            self._c0, self._last_c, self._epoch = c, c, self._epoch + 1
            self._estimate_j = self._reported_j = 0.0
        elif c != self._last_c:  # a tick: the counter's own value, exact up to its tick
            self._last_c, self._estimate_j = c, (c - self._c0) / 1e3
        else:
            # Not yet: the time since the LAST READ at the power now (what the GPU did since
            # that read: drafting, or waiting), not the time since the tick at today's power,
            # which charged a whole tick interval at the power of the phase that just ended.
            with contextlib.suppress(self.nv.NVMLError):  # no power now: nothing added
                self._estimate_j += self.power_w() * max(now - self._last_read_t, 0.0)
        # A caller's `now` is read before the lock: a later read may bring an earlier time, whose
        # interval the read before it counted already (taking it as the last read counted it twice).
        self._last_read_t = max(self._last_read_t, now)
        self._reported_j = max(self._reported_j, self._estimate_j)  # never less than already said
        return self._reported_j

    def close(self) -> None:
        """Once: NVML counts inits and shutdowns, so a second shutdown would end another meter's."""
        if self._closed:
            return
        self._closed = True
        if self.integrator is not None:
            self.integrator.stop()
        with contextlib.suppress(Exception):  # shutting down after a driver error is harmless
            self.nv.nvmlShutdown()
