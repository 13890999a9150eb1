"""Energy meters (one per source), the radio model and meter selection.

Contract: `open_meter(spec, profile, device)` returns a `Meter` for `auto`, `nvml`, `rapl`,
`jetson`, `cpu-model`, `replay:FILE` or `none` (the null meter: every reading NaN, labelled
unavailable). `auto` probes nvml → rapl → jetson and falls back to the
labelled `cpu-model` estimate; given the drafter's `device`, NVML reads the GPU the drafter runs
on, and `auto` skips it for a drafter on the CPU. Asking for a specific source that is missing
raises `MeterUnavailable`; nothing ever turns a missing sensor into 0 J.
"""

from __future__ import annotations

import logging

from gelato.power.base import Kind, Meter, MeterUnavailable, NullMeter, Reading
from gelato.power.cpu_model import PROFILES, CpuModelMeter, DeviceProfile
from gelato.power.radio import RADIOS, RadioProfile, radio_profile

log = logging.getLogger(__name__)

SOURCES = ("nvml", "rapl", "jetson", "cpu-model")
# Sources that read the whole host (its GPU, CPU packages, board), not one process: an edge on the
# same host is in their readings.
HOST_WIDE = {"nvml": "the whole GPU", "rapl": "whole CPU packages", "jetson": "the whole board"}


def on_cpu(device: str) -> bool:
    """`--device` names a CPU-side device (no torch needed to tell)."""
    return device == "cpu" or device.startswith(("cpu:", "mps"))


def cuda_uuid(device: str) -> str | None:
    """NVML's name (`GPU-<uuid>`) of the CUDA device torch runs `--device DEVICE` on (`auto`:
    CUDA when available), None when that is no CUDA device. By UUID, since NVML counts GPUs in
    PCI order and ignores CUDA_VISIBLE_DEVICES, while torch's `cuda:N` follows both."""
    if on_cpu(device):
        return None
    import torch

    if not torch.cuda.is_available() or not (device == "auto" or device.startswith("cuda")):
        return None
    try:
        index = torch.device(device if device != "auto" else "cuda").index
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    except (RuntimeError, AssertionError, ValueError):  # no such device: loading the drafter will say so
        return None
    return f"GPU-{props.uuid}"


def open_source(source: str, profile: str = "phone", device: str | None = None) -> Meter:
    """One named source; raises MeterUnavailable when it cannot read here. `device`: the
    drafter's `--device`; NVML then reads the GPU it runs on (None, or a CPU drafter: GPU 0)."""
    if source == "nvml":
        return _nvml(cuda_uuid(device) if device is not None else None)
    if source == "rapl":
        from gelato.power.rapl import RaplMeter

        return RaplMeter()
    if source == "jetson":
        from gelato.power.jetson import JetsonMeter

        return JetsonMeter()
    if source == "cpu-model":
        return CpuModelMeter(profile)
    if source.startswith("replay:"):
        from gelato.power.replay import ReplayMeter

        return ReplayMeter(source.removeprefix("replay:"))
    if source == "none":  # no energy at all: every reading NaN, labelled unavailable
        return NullMeter()
    raise ValueError(f"unknown meter {source!r}; use auto, {', '.join(SOURCES)}, replay:FILE or none")


def _nvml(uuid: str | None) -> Meter:
    from gelato.power.nvml import NvmlMeter

    return NvmlMeter(uuid=uuid)


def open_meter(spec: str = "auto", profile: str = "phone", device: str | None = None) -> Meter:
    """`device`: the drafter's `--device` (None: not known). `auto` then skips NVML when the
    drafter runs on no CUDA device (a laptop's idle discrete GPU is not the drafter's energy)."""
    if spec != "auto":
        return open_source(spec, profile, device)
    uuid = cuda_uuid(device) if device is not None else None
    why: dict[str, str] = {}  # each source that could not read here, and why
    if device is None or uuid is not None:
        try:
            meter = _nvml(uuid)
        except MeterUnavailable as exc:
            why["nvml"] = str(exc)
        else:
            log.info("power meter: nvml (measured)")
            return meter
    for source in ("rapl", "jetson"):
        try:
            meter = open_source(source, profile)
        except MeterUnavailable as exc:
            why[source] = str(exc)
            continue
        # Said, not silent: the drafter's GPU is not in what RAPL reads. A Jetson's integrated GPU
        # is on the board's rails (VDD_IN, VDD_GPU_SOC), which its meter reads: nothing to say.
        if uuid is not None and source != "jetson":
            log.warning(
                "the drafter runs on %s but NVML cannot read it (%s): %s meters the host without that GPU",
                device,
                why["nvml"],
                source,
            )
        log.info("power meter: %s (measured)%s", source, "".join(f"; {k}: {v}" for k, v in why.items()))
        return meter
    # The estimate (labelled so in every record), and why no meter, at --log-level INFO (e.g. RAPL
    # present but root-only: a user may fix that); a WARNING when the drafter's own GPU goes
    # unmetered: the estimate counts CPU time only, and the GPU does the drafting.
    reasons = "; ".join(f"{k}: {v}" for k, v in why.items()) or "no GPU drafter, no RAPL, no Jetson rails"
    if uuid is not None:
        log.warning(
            "the drafter runs on %s but no meter reads here (%s): energy is the cpu-model ESTIMATE of CPU "
            "time only, without that GPU",
            device,
            reasons,
        )
    else:
        log.info("no power meter reads here (%s): energy is the cpu-model ESTIMATE", reasons)
    return CpuModelMeter(profile)


__all__ = [
    "HOST_WIDE",
    "PROFILES",
    "RADIOS",
    "CpuModelMeter",
    "DeviceProfile",
    "Kind",
    "Meter",
    "MeterUnavailable",
    "NullMeter",
    "RadioProfile",
    "Reading",
    "cuda_uuid",
    "on_cpu",
    "open_meter",
    "open_source",
    "radio_profile",
]
