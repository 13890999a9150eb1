"""Per-round device energy accounting: meter delta + radio model.

Contract: `EnergyAccountant(meter, radio)` brackets a generation (`begin`/`end`, then the session's
close: `after_end_j`) and each round (`round_start`/`round_end`). A round's energy is the meter's
delta over the whole round — which already contains idle power while waiting for the edge, so
nothing idle is added — plus the radio energy of the bytes it sent and received and of the radio's
connected state between its transfers (the profile's tail power over each gap, up to `tail_s`); a
generation that exchanged any bytes is charged those gaps and the radio's tail once, less the part
the next transfer cuts short (`EnergyAccountant`), one that exchanged none (`ar-device`) no radio
energy at all. Byte counts are protobuf sizes plus gRPC/HTTP2 framing (5 + 9 bytes per message);
TCP/IP headers are not counted. A meter that cannot read yields NaN.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from gelato.power import Meter, RadioProfile, Reading
from gelato.types import DraftBlock, GenerationStats, Telemetry, Verdict

log = logging.getLogger(__name__)

FRAMING_BYTES = 5 + 9  # gRPC length prefix + HTTP/2 DATA frame header


def wire_bytes(message_size: int) -> int:
    return message_size + FRAMING_BYTES


class EnergyAccountant:
    """The radio between transfers: after each transfer it stays connected, at the profile's
    `tail_mw`, until the next one or for `tail_s` (`RadioProfile.gap_energy_j`). On LTE that is ~1 W
    for the whole of a generation whose rounds come faster than every 11.6 s, whatever each round
    sends (a round's bytes alone cost it microseconds of transfer). So every gap between two
    transfers of a generation is charged, each up to `tail_s`, from the first transfer the edge
    client marks (`radio_busy`, before the open; a loop run without it, e.g. `ar-device`, has no
    gaps): the part within a round (from `round_start` to `round_end`; the transfers being the
    previous verdict, the block's send at `drafted` and the verdict at `round_end`; with `--pipeline
    send-ahead`, whose sends are not marked, the rounds' verdicts, which differs only for rounds
    longer than `tail_s`) in the round's `e_radio_j` (and `e_radio_link_j`), the rest (the open's
    wait while the edge prefills, the drafter's prefill, the loop's work between rounds) in the
    generation's total only. Each transfer's own time is charged at the transfer power, not also at
    the tail's.

    After a burst of traffic (`radio_idle`: a generation's end, an open that failed, an `Info` ask)
    a whole tail is charged, and the next transfer (`radio_busy`: the next open, back to back in a
    run or after a failover; an ask while waiting for the edge) gives back the part the radio, busy
    again, never spent. So a run is charged the tails that really happen: the gaps shorter than
    `tail_s`, and a whole tail after its last transfer (each prompt of a run once got a whole tail,
    12.3 J on LTE, although the next prompt came at once). Radio joules not yet in a total wait in
    `_tail_j` and `_gaps_j` and go into the next one closed (`end`, `opening_spent_j`)."""

    def __init__(self, meter: Meter, radio: RadioProfile | None) -> None:
        self.meter = meter
        self.radio = radio
        self._opening: Reading | None = None
        self._ended: Reading | None = None  # the last generation's (or failed open's) final reading
        self._tail_from_s: float | None = None  # meter clock when the pending (charged) tail began
        self._tail_j = 0.0  # tail joules charged or given back, in no total yet
        self._last_transfer_s: float | None = None  # meter clock of the last transfer; None: idle
        self._gaps_j = 0.0  # gap joules between transfers, in no total yet
        self._gap_charged_j = 0.0  # of the gap since the last transfer, the joules already charged
        self._round_link_j = 0.0  # gap joules within the round under way
        self._warned_unread = False

    def radio_j(self, bytes_up: int, bytes_down: int) -> float:
        return self.radio.round_energy_j(bytes_up, bytes_down) if self.radio else 0.0

    def radio_busy(self) -> None:
        """The radio transfers from now on: the pending tail ends here, and the part of it not
        spent is given back."""
        self._transfer()
        start, self._tail_from_s = self._tail_from_s, None
        if start is None or self.radio is None or not self.radio.tail_s:
            return
        spent_s = min(max(self.meter.clock() - start, 0.0), self.radio.tail_s)
        self._tail_j -= self.radio.tail_energy_j() * (1.0 - spent_s / self.radio.tail_s)

    def radio_idle(self) -> None:
        """The last transfer for now: a whole tail is charged from here (until `radio_busy`)."""
        self._transfer()
        self._last_transfer_s = None
        if self.radio is not None and self.radio.tail_s:
            self._tail_j += self.radio.tail_energy_j()
            self._tail_from_s = self.meter.clock()

    def _transfer(self, now: float | None = None) -> None:
        """A transfer at `now` (the meter's clock; default: now): the gap since the last one (while
        the radio is busy) is charged, to the generation and to the round under way; the next gap
        starts here."""
        now = self.meter.clock() if now is None else now
        self._charge_gap(True, now)
        self._last_transfer_s, self._gap_charged_j = now, 0.0

    def _charge_gap(self, to_round: bool, now: float) -> None:
        """The current gap's joules until `now` (capped at the tail over the whole gap), less what an
        earlier call charged of it: to the generation, and with `to_round` to the round's share."""
        if self._last_transfer_s is None or self.radio is None:
            return
        so_far_j = self.radio.gap_energy_j(now - self._last_transfer_s)
        piece_j, self._gap_charged_j = so_far_j - self._gap_charged_j, so_far_j
        self._gaps_j += piece_j
        if to_round:
            self._round_link_j += piece_j

    def _link_j(self, gaps_j: float, bytes_up: int, bytes_down: int) -> float:
        return self.radio.link_energy_j(gaps_j, bytes_up, bytes_down) if self.radio is not None else 0.0

    def _settle_radio_j(self, bytes_up: int = 0, bytes_down: int = 0) -> float:
        """The radio joules in no total yet: tails, and gaps less the tail power over the transfers
        of `bytes_up`/`bytes_down` (inside those gaps, and charged at the transfer power)."""
        tail_j = self._tail_j + self._link_j(self._gaps_j, bytes_up, bytes_down)
        self._tail_j = self._gaps_j = 0.0
        return tail_j

    def opening(self) -> None:
        """A generation starts here, before its session is opened (or re-opened after a
        failover): `begin` measures from this reading, so the wait while the edge opens the
        session and prefills the prompt (and, in a failover, the wait for the edge) is the
        generation's energy too. The radio tail is cut where a transfer really starts
        (`radio_busy`), not here."""
        # A re-open after a session ended (a failover) starts from that session's last reading:
        # the time between (the lost stream's end, the retry) is the generation's, as in elapsed_s.
        self._opening, self._ended = self._ended or self.meter.read(), None

    def forget_opening(self) -> None:
        """Drop an `opening` reading no generation began from (the open failed)."""
        self._opening = None

    def abandon(self) -> None:
        """A generation that raised reports no energy: the radio joules pending (its attempts'
        tails and gaps) are in no total, so the tail it started is no one's to give back at the
        next transfer, and no gap runs on from its last mark."""
        self._tail_from_s = self._last_transfer_s = self._ended = None
        self._tail_j = self._gaps_j = self._gap_charged_j = self._round_link_j = 0.0

    def opening_spent_j(self) -> tuple[float, float]:
        """An `opening` no generation began from (a re-open that failed: the reconnect and the
        attempt cost the device all the same): (joules the meter saw since it, NaN when it cannot
        read; radio tail joules: the attempt's own tail, with what is pending, e.g. the part of
        the last tail it cut short given back). The reading is dropped; (0, 0) without one."""
        start, self._opening = self._opening, None
        if start is None:
            return 0.0, 0.0
        end = self._ended = self.meter.read()
        self.radio_idle()
        return end.since(start), self._settle_radio_j()

    def begin(self, stats: GenerationStats) -> Reading:
        """The generation's first reading: the one `opening` took, else now."""
        stats.energy_source, stats.energy_kind = self.meter.source, self.meter.kind
        stats.radio_model = self.radio.label if self.radio is not None else ""
        start, self._opening = self._opening, None
        if self._last_transfer_s is not None:  # the open's answer just arrived: its wait is no round's
            self._transfer()
        self._round_link_j = 0.0
        return start if start is not None else self.meter.read()

    def end(self, stats: GenerationStats, start: Reading) -> None:
        """Totals for the generation, including the messages outside any round (the open; the
        close is added once written, `gelato.device.generate.charge_bytes`), and its radio tail
        (see the class docstring)."""
        end = self.meter.read()
        if stats.bytes_up or stats.bytes_down:  # no traffic (ar-device): no tail
            self.radio_idle()
        else:  # no transfer ends here (without any, `ar-device`, no gap was charged either)
            self._charge_gap(False, end.t_s)
            self._last_transfer_s = None
        transfer_j = self.radio_j(stats.bytes_up, stats.bytes_down)
        stats.radio_j = transfer_j + self._settle_radio_j(stats.bytes_up, stats.bytes_down)
        self._round_link_j = 0.0
        stats.energy_j = end.since(start) + stats.radio_j
        self._ended = end
        if math.isnan(stats.energy_j) and not self._warned_unread and self.meter.source != "none":
            self._warned_unread = True  # once a run: a meter that stays unreadable would say it per prompt
            log.warning(
                "energy meter %s could not be read during a generation: its energy is unknown (null in the "
                "results) and not charged to an energy budget",
                self.meter.source,
            )

    def after_end_j(self) -> float:
        """Meter joules from the last `end` (or failed open) to now, once: the time a generation
        takes after its totals are made (the session's close written, the stream ended) is its
        own too, as its `elapsed_s` says. NaN when the meter cannot read; 0 with nothing ended."""
        start, self._ended = self._ended, None
        return self.meter.read().since(start) if start is not None else 0.0

    def round_start(self) -> Reading:
        """The round's first reading; the radio's gap so far is the generation's, not the round's
        (e.g. the drafter's prefill before the first round)."""
        reading = self.meter.read()  # the round's time and its share of the gaps start together
        self._charge_gap(False, reading.t_s)
        self._round_link_j = 0.0
        return reading

    def drafted(self) -> Reading:
        """A reading when drafting ends: the round's drafting energy is then measured, not fitted.
        The block is sent next: a transfer (the radio's gap while drafting ends here)."""
        reading = self.meter.read()
        if self._last_transfer_s is not None:
            self._transfer(reading.t_s)
        return reading

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
        if self._last_transfer_s is not None:  # the verdict has just arrived
            self._transfer(end.t_s)
        e_link = self._link_j(self._round_link_j, bytes_up, bytes_down)
        self._round_link_j = 0.0
        t_round = end.t_s - start.t_s
        e_compute = end.since(start)
        e_radio = self.radio_j(bytes_up, bytes_down) + e_link
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
            e_radio_link_j=e_link,
            e_j=e_compute + e_radio,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            energy_source=self.meter.source,
            energy_kind=self.meter.kind,
            bonus_guess_hit=block.bonus_guess_hit,
            **fields,
        )
