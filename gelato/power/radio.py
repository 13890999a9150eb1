"""Radio energy per round from bytes and link rates. Pure math, no I/O.

Contract: `RadioProfile.round_energy_j(bytes_up, bytes_down)` = P_up·t_up + P_down·t_down with
t = bits / link rate and P from the linear model of Huang et al. (MobiSys 2012):
power_mW = a_u·r_u + a_d·r_d + b (r in Mbit/s). NVML/RAPL do not see the radio, so this is added to
the meter's delta. Between transfers the radio stays in its connected state at `tail_mw` for up
to `tail_s` (the inactivity timer), then drops to idle: `gap_energy_j(gap_s)` is what one gap
between two transfers costs, and `tail_energy_j()` the whole tail after the last transfer
(`gelato.device.energy` charges both: every gap of a generation, and one whole tail at its end,
less what the next transfer cuts short). Every constant is a profile parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RadioProfile:
    name: str
    a_up_mw_per_mbps: float
    a_down_mw_per_mbps: float
    base_mw: float
    up_mbps: float  # link rate used for t_up
    down_mbps: float
    tail_s: float = 0.0
    tail_mw: float = 0.0
    note: str = ""

    @property
    def label(self) -> str:
        """The name, with the link rates when they are not the named profile's own."""
        own = RADIOS.get(self.name)
        if own is not None and (own.up_mbps, own.down_mbps) == (self.up_mbps, self.down_mbps):
            return self.name
        return f"{self.name} {self.up_mbps:g}/{self.down_mbps:g} Mbit/s"

    def upload_power_w(self) -> float:
        return (self.a_up_mw_per_mbps * self.up_mbps + self.base_mw) / 1e3

    def download_power_w(self) -> float:
        return (self.a_down_mw_per_mbps * self.down_mbps + self.base_mw) / 1e3

    def transfer_s(self, bytes_up: int, bytes_down: int) -> tuple[float, float]:
        return bytes_up * 8 / (self.up_mbps * 1e6), bytes_down * 8 / (self.down_mbps * 1e6)

    def round_energy_j(self, bytes_up: int, bytes_down: int) -> float:
        t_up, t_down = self.transfer_s(bytes_up, bytes_down)
        return self.upload_power_w() * t_up + self.download_power_w() * t_down

    def tail_energy_j(self) -> float:
        return self.tail_s * self.tail_mw / 1e3

    def gap_energy_j(self, gap_s: float) -> float:
        """A gap of `gap_s` between two transfers: connected-state power until the tail runs out
        (a longer gap lets the radio go idle; the next transfer's promotion is not modelled)."""
        return min(max(gap_s, 0.0), self.tail_s) * self.tail_mw / 1e3

    def link_energy_j(self, gaps_j: float, bytes_up: int, bytes_down: int) -> float:
        """Gap joules (`gap_energy_j`, summed) less the tail power over the transfers of these bytes,
        which lie inside the gaps and are charged at the transfer power instead."""
        t_up, t_down = self.transfer_s(bytes_up, bytes_down)
        return max(gaps_j - (t_up + t_down) * self.tail_mw / 1e3, 0.0) if gaps_j else 0.0


RADIOS = {
    r.name: r
    for r in (
        RadioProfile(
            "wifi",
            283.17,
            137.01,
            132.86,
            up_mbps=50.0,
            down_mbps=50.0,
            tail_s=0.24,
            tail_mw=119.3,
            note="Huang et al. 2012 Wi-Fi model; 50 Mbit/s link (the wifi profile)",
        ),
        RadioProfile(
            "lte",
            438.39,
            51.97,
            1288.04,
            up_mbps=10.0,
            down_mbps=30.0,
            tail_s=11.6,
            tail_mw=1060.0,
            note="Huang et al. 2012 LTE model and tail; 10 Mbit/s up, 30 down",
        ),
        RadioProfile(
            "5g",
            200.0,
            40.0,
            2000.0,
            up_mbps=100.0,
            down_mbps=400.0,
            tail_s=10.0,
            tail_mw=1200.0,
            note="assumed: LTE-like linear form with a higher base power and faster link (no single "
            "reference model); replace with measured constants for a given modem",
        ),
    )
}


def radio_profile(name: str, up_mbps: float = 0.0, down_mbps: float = 0.0) -> RadioProfile | None:
    """A named profile; `none` (no radio energy) gives None. `up_mbps`/`down_mbps` > 0 replace the
    profile's link rates (the link actually used, e.g. an emulated channel's: the transfer time and
    the power of the linear model both follow the rate); 0 keeps the profile's own."""
    if name == "none":
        return None
    if name not in RADIOS:
        raise ValueError(f"unknown radio {name!r}; known: {', '.join(RADIOS)}, none")
    for what, rate in (("up", up_mbps), ("down", down_mbps)):
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"radio {what} rate must be a finite number >= 0 Mbit/s, not {rate!r}")
    prof = RADIOS[name]
    return replace(prof, up_mbps=up_mbps or prof.up_mbps, down_mbps=down_mbps or prof.down_mbps)
