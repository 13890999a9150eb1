"""Energy meters (one per source), the radio model and meter selection.

Contract: `open_meter(spec, profile)` returns a `Meter` for `auto`, `nvml`, `rapl`, `jetson`,
`cpu-model` or `replay:FILE`. `auto` probes nvml → rapl → jetson and falls back to the labelled
`cpu-model` estimate. Asking for a specific source that is missing raises `MeterUnavailable`;
nothing ever turns a missing sensor into 0 J.
"""

from __future__ import annotations

from gelato.power.base import Kind, Meter, MeterUnavailable, NullMeter, Reading
from gelato.power.cpu_model import PROFILES, CpuModelMeter, DeviceProfile
from gelato.power.radio import RADIOS, RadioProfile, radio_profile

SOURCES = ("nvml", "rapl", "jetson", "cpu-model")


def open_source(source: str, profile: str = "phone") -> Meter:
    """One named source; raises MeterUnavailable when it cannot read here."""
    if source == "nvml":
        from gelato.power.nvml import NvmlMeter

        return NvmlMeter()
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
    raise ValueError(f"unknown meter {source!r}; use auto, {', '.join(SOURCES)} or replay:FILE")


def open_meter(spec: str = "auto", profile: str = "phone") -> Meter:
    if spec != "auto":
        return open_source(spec, profile)
    for source in ("nvml", "rapl", "jetson"):
        try:
            return open_source(source, profile)
        except MeterUnavailable:
            continue
    return CpuModelMeter(profile)


__all__ = [
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
    "open_meter",
    "open_source",
    "radio_profile",
]
