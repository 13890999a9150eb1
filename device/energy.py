"""Per-round device energy accounting: meter delta + radio model.

Contract: `EnergyAccountant(meter, radio)` brackets a generation (`begin`/`end`) and each round
(`round_start`/`round_end`). A round's energy is the meter's delta over the whole round — which
already contains idle power while waiting for the edge, so nothing idle is added — plus the radio
energy of the bytes it sent and received; a generation that exchanged any bytes is charged the
radio's tail once, less the part the next activity cuts short (`EnergyAccountant`), one that
exchanged none (`ar-device`) no radio energy at all. Byte counts are
protobuf sizes plus gRPC/HTTP2 framing (5 + 9 bytes per message); TCP/IP headers are not
counted. A meter that cannot read yields NaN.
"""

from __future__ import annotations

from typing import Any

from gelato.power import Meter, RadioProfile, Reading
from gelato.types import DraftBlock, GenerationStats, Telemetry, Verdict

FRAMING_BYTES = 5 + 9  # gRPC length prefix + HTTP/2 DATA frame header


def wire_bytes(message_size: int) -> int:
    return message_size + FRAMING_BYTES


class EnergyAccountant:
    """Radio tail (`RadioProfile.tail_s` at `tail_mw` after the last transfer): each generation
    that exchanged bytes is charged a whole tail at its `end`, and the next activity on the radio
    (the next generation's `opening`, back to back in a run or after a failover; an open that
    fails) gives back the part of it that the radio, busy again, never spent: so a run is charged
    the tails that really happen, gaps shorter than `tail_s` and one whole tail at its end (each
    prompt of a run once got a whole tail, 12.3 J on LTE, although the next prompt came at once)."""

    def __init__(self, meter: Meter, radio: RadioProfile | None) -> None:
        self.meter = meter
        self.radio = radio
        self._opening: Reading | None = None
        self._tail_from_s: float | None = None  # meter clock when the last charged tail began
        self._tail_refund_j = 0.0  # the part of that tail the opening cut short

    def radio_j(self, bytes_up: int, bytes_down: int) -> float:
        return self.radio.round_energy_j(bytes_up, bytes_down) if self.radio else 0.0

    def _cut_tail_j(self, now_s: float) -> float:
        """The part of the last charged tail the radio does not spend, being active again at
        `now_s` (0 when that tail had ended, or none was charged); the tail is then settled."""
        start, self._tail_from_s = self._tail_from_s, None
        if start is None or self.radio is None or not self.radio.tail_s:
            return 0.0
        spent_s = min(max(now_s - start, 0.0), self.radio.tail_s)
        return self.radio.tail_energy_j() * (1.0 - spent_s / self.radio.tail_s)

    def opening(self) -> None:
        """A generation starts here, before its session is opened (or re-opened after a
        failover): `begin` measures from this reading, so the wait while the edge opens the
        session and prefills the prompt is the generation's energy too. The radio is active
        again: the part of the last tail it cuts short is given back at this generation's `end`."""
        self._opening = self.meter.read()
        self._tail_refund_j = self._cut_tail_j(self._opening.t_s)

    def forget_opening(self) -> None:
        """Drop an `opening` reading no generation began from (the open failed)."""
        self._opening, self._tail_refund_j = None, 0.0

    def opening_spent_j(self) -> tuple[float, float]:
        """An `opening` no generation began from (a re-open that failed: the reconnect and the
        attempt cost the device all the same): (joules the meter saw since it, NaN when it cannot
        read; radio joules: the attempt's own tail, less what the attempt cut short of the last
        one). The reading is dropped; (0, 0) without one."""
        start, self._opening = self._opening, None
        if start is None:
            return 0.0, 0.0
        end = self.meter.read()
        radio_j = 0.0
        if self.radio is not None:
            radio_j = self.radio.tail_energy_j() - self._tail_refund_j
            self._tail_from_s = end.t_s
        self._tail_refund_j = 0.0
        return end.since(start), radio_j

    def begin(self, stats: GenerationStats) -> Reading:
        """The generation's first reading: the one `opening` took, else now."""
        stats.energy_source, stats.energy_kind = self.meter.source, self.meter.kind
        start, self._opening = self._opening, None
        return start if start is not None else self.meter.read()

    def end(self, stats: GenerationStats, start: Reading) -> None:
        """Totals for the generation, including the messages outside any round (the open; the
        close is added once written, `gelato.device.generate.charge_bytes`), and its radio tail
        (see the class docstring)."""
        end = self.meter.read()
        stats.radio_j = self.radio_j(stats.bytes_up, stats.bytes_down)
        if self.radio and (stats.bytes_up or stats.bytes_down):  # no traffic (ar-device): no tail
            stats.radio_j += self.radio.tail_energy_j() - self._tail_refund_j
            self._tail_from_s = end.t_s
        self._tail_refund_j = 0.0
        stats.energy_j = end.since(start) + stats.radio_j

    def round_start(self) -> Reading:
        return self.meter.read()

    def drafted(self) -> Reading:
        """A reading when drafting ends: the round's drafting energy is then measured, not fitted."""
        return self.meter.read()

    def round_end(
        self,
        start: Reading,
        block: DraftBlock,
        verdict: Verdict,
        emitted: int,
        bytes_up: int,
        bytes_down: int,
        drafted: Reading | None = None,
        **fields: Any,
    ) -> Telemetry:
        """The round's telemetry; `fields`: the loop's own fields (controller view, pipelining),
        set here so that the (frozen) record is built once per round."""
        end = self.meter.read()
        t_round = end.t_s - start.t_s
        e_compute = end.since(start)
        e_radio = self.radio_j(bytes_up, bytes_down)
        edge_s = (verdict.queue_ms + verdict.compute_ms) / 1e3
        # The drafting phase as the drafting reading saw it (thread hops included), else the
        # drafting alone: the transport time is the rest of the round outside the edge.
        drafting_s = drafted.t_s - start.t_s if drafted is not None else block.draft_s
        if "t_net_s" not in fields:
            fields["t_net_s"] = max(0.0, t_round - drafting_s - edge_s)
        return Telemetry(
            round=block.round,
            k=block.k,
            accepted=verdict.n_accepted,
            emitted=emitted,
            t_round_s=t_round,
            t_draft_s=block.draft_s,
            t_edge_queue_s=verdict.queue_ms / 1e3,
            t_edge_compute_s=verdict.compute_ms / 1e3,
            e_compute_j=e_compute,
            e_draft_j=drafted.since(start) if drafted is not None else float("nan"),
            t_drafted_s=drafting_s if drafted is not None else float("nan"),
            e_radio_j=e_radio,
            e_j=e_compute + e_radio,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            energy_source=self.meter.source,
            energy_kind=self.meter.kind,
            **fields,
        )
