"""Online estimates of what a round costs, as a function of how many tokens it drafts.

Contract: `CostEstimator.observe(tele)` takes one round's `Telemetry`; `model()` returns a frozen
`CostModel` snapshot with which the objective evaluates any draft length K:

    T̂(K) = t̂_draft(K) + t̂_edge(K) + t̂_net(K),   t̂_draft(K) = [K > 0]·t̂_draft0 + K·t̂_draft
    Ê(K) = P̂_draft·t̂_draft(K) + P̂_wait·(t̂_edge(K) + t̂_net(K)) + P̂_link·T̂(K) + ê_radio(K)
    α̂    = accepted / observed drafts (a token after a block's first rejection is unobserved)
           (`observed_drafts` counts them all, undecayed: how much evidence there is at all;
           `alpha_upper`: the upper end of α̂'s interval, for the policies' cold start)

P̂_link is the radio's connected state between transfers (`Telemetry.e_radio_link_j` over the round's
time: drawn whatever K), ê_radio(K) the transfers' own energy (the rest of `e_radio_j`).

Every estimate is exponentially weighted with one half-life (in rounds), so it follows a channel or
an edge load that drifts. Drafting time, edge time, network time and radio energy are fitted as
`a + b·K` (`EwLinear`): a block's first drafter forward also feeds the round's new tokens and the
drafter thread has to wake up (so a 1-draft block costs more than a draft of a long block),
verifying more drafts costs more on a CPU edge, a bigger block takes longer to send.
Device energy is split into drafting power and waiting (idle) power: measured, when the meter was
also read at the end of drafting (`Telemetry.e_draft_j`, what the device loop does), as energy over
time on each side of that reading; otherwise by a weighted least-squares fit of each round's metered
energy on its drafting and waiting time. The waiting power is the device's idle power. A
round whose meter cannot read (NaN) updates the time estimates only. Before any data the priors
hold (`CostPriors`). The transport time is learned from blocks not sent ahead only: one sent ahead
waits at the edge behind the blocks before it, and that wait is in its `t_net_s`. Pure arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gelato.types import Telemetry

DEFAULT_HALFLIFE_ROUNDS = 20.0


def wilson_upper(p: float, n: float, z: float) -> float:
    """The upper end of the Wilson score interval for a rate `p` seen over `n` (weighted) trials at
    `z` standard errors. Unlike p + z·sqrt(p(1 − p)/n) it stays above p when p is 0 and n is small:
    a handful of rejections never makes acceptance look certainly nil. n <= 0: 1."""
    if n <= 0:
        return 1.0
    z2 = z * z
    spread = z * math.sqrt(max(p * (1.0 - p), 0.0) / n + z2 / (4.0 * n * n))
    return min((p + z2 / (2.0 * n) + spread) / (1.0 + z2 / n), 1.0)


def decay_of(halflife_rounds: float) -> float:
    if not halflife_rounds > 0:
        raise ValueError(f"the estimator half-life must be > 0 rounds, got {halflife_rounds}")
    return 0.5 ** (1.0 / halflife_rounds)


@dataclass
class Ewma:
    """Weighted exponentially-decaying mean; `prior` until the first sample."""

    decay: float
    prior: float
    _num: float = 0.0
    _den: float = 0.0

    def update(self, x: float, weight: float = 1.0) -> None:
        self._num = self.decay * self._num + weight * x
        self._den = self.decay * self._den + weight

    @property
    def value(self) -> float:
        return self._num / self._den if self._den > 0 else self.prior

    @property
    def weight(self) -> float:
        return self._den


@dataclass
class EwLinear:
    """Exponentially weighted least squares of y = a + b·x. The slope is pulled by a ridge of
    `ridge` pseudo-samples towards an anchor: `prior_slope` at first, then the slope fitted at the
    last update (so a policy that always drafts the same K still yields a usable slope, and keeps
    the one it measured when K varied: with the anchor fixed at the prior, the forgetting emptied
    the spread of x, and rounds at one K pulled a measured 40 ms a token back to the prior within
    a few hundred rounds, the intercept taking the rest). Clipped at `min_slope`; an intercept
    below `min_intercept` (a time or an energy below 0) is raised to it, the slope then passing
    through the mean point."""

    decay: float
    prior_intercept: float
    prior_slope: float = 0.0
    ridge: float = 1.0
    min_slope: float = 0.0
    min_intercept: float = 0.0
    _s: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σw, Σwx, Σwy, Σwxx, Σwxy
    _anchor: float | None = None  # the ridge's target: None = prior_slope

    def update(self, x: float, y: float) -> None:
        d = self.decay
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            self._s[i] = d * self._s[i] + v
        # The posterior becomes the next prior: where data spreads in x the fit follows it (at a
        # fixed point the anchor changes nothing: s = (cov + r·s)/(var + r) gives s = cov/var), and
        # where it no longer does the last slope stays instead of drifting back to the prior.
        self._anchor = self._ridge_slope()

    def _ridge_slope(self) -> float:
        w, sx, sy, sxx, sxy = self._s
        anchor = self.prior_slope if self._anchor is None else self._anchor
        mx, my = sx / w, sy / w
        var, cov = sxx - w * mx * mx, sxy - w * mx * my
        return max((cov + self.ridge * anchor) / (var + self.ridge), self.min_slope)

    def coefficients(self) -> tuple[float, float]:
        w, sx, sy, _, _ = self._s
        if w <= 0:
            return self.prior_intercept, self.prior_slope
        mx, my = sx / w, sy / w
        slope = self._ridge_slope()
        intercept = my - slope * mx
        if intercept < self.min_intercept and mx > 0:
            intercept = self.min_intercept
            slope = max((my - intercept) / mx, self.min_slope)
        return intercept, slope


@dataclass
class EwPowerSplit:
    """E ≈ P_draft·t_draft + P_wait·t_wait, weighted least squares with a ridge towards the priors."""

    decay: float
    prior_draft_w: float
    prior_wait_w: float
    ridge_s2: float = 1e-6  # the priors weigh like one round of 1 ms: gone after a few rounds
    _s: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σdd, Σdw, Σww, Σde, Σwe

    def update(self, t_draft_s: float, t_wait_s: float, e_j: float) -> None:
        d = self.decay
        for i, v in enumerate((t_draft_s**2, t_draft_s * t_wait_s, t_wait_s**2, t_draft_s * e_j, t_wait_s * e_j)):
            self._s[i] = d * self._s[i] + v

    def powers_w(self) -> tuple[float, float]:
        dd, dw, ww, de, we = self._s
        r = self.ridge_s2
        a11, a12, a22 = dd + r, dw, ww + r
        b1, b2 = de + r * self.prior_draft_w, we + r * self.prior_wait_w
        det = a11 * a22 - a12 * a12
        if det <= 0:
            return self.prior_draft_w, self.prior_wait_w
        p_draft, p_wait = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
        if p_wait < 0 or p_draft < 0:
            # Collinear or noisy rounds: one common power over the whole round is the safe answer.
            total_tt = dd + 2 * dw + ww
            common = (de + we) / total_tt if total_tt > 0 else self.prior_wait_w
            return max(common, 0.0), max(common, 0.0)
        return p_draft, p_wait


@dataclass(frozen=True)
class CostPriors:
    """Starting values, replaced by measurements within a few rounds."""

    t_draft_s: float = 2e-3
    t_edge_s: float = 5e-3
    t_net_s: float = 10e-3
    p_draft_w: float = 2.0
    p_wait_w: float = 0.5
    alpha: float = 0.6
    alpha_weight: float = 4.0  # pseudo-tokens behind the acceptance prior


@dataclass(frozen=True)
class CostModel:
    """One snapshot of the estimates: everything the objective needs, as plain numbers."""

    t_draft_s: float  # per drafted token
    t_edge0_s: float
    t_edge_per_token_s: float
    t_net0_s: float
    t_net_per_token_s: float
    p_draft_w: float
    p_wait_w: float
    e_radio0_j: float
    e_radio_per_token_j: float
    alpha: float
    t_draft0_s: float = 0.0  # once per block with at least one draft
    # The radio's connected state between transfers (`Telemetry.e_radio_link_j`): drawn for the
    # whole round, drafting or waiting, whatever K, so time costs it; not part of the two above
    # (a drafted token thrown away costs no radio: the radio is on anyway).
    p_link_w: float = 0.0

    def draft_s(self, k: float) -> float:
        return self.t_draft0_s + k * self.t_draft_s if k > 0 else 0.0

    def wait_s(self, k: float) -> float:
        return self.t_edge0_s + self.t_net0_s + k * (self.t_edge_per_token_s + self.t_net_per_token_s)

    def time_s(self, k: float) -> float:
        """T̂(K): drafting, then edge and transport."""
        return self.draft_s(k) + self.wait_s(k)

    def energy_j(self, k: float) -> float:
        """Ê(K): drafting, waiting (idle power over edge + transport time) and radio (its transfers,
        and its connected state over the whole round)."""
        return (
            self.draft_s(k) * self.p_draft_w
            + self.wait_s(k) * self.p_wait_w
            + self.time_s(k) * self.p_link_w
            + self.e_radio0_j
            + k * self.e_radio_per_token_j
        )


class CostEstimator:
    def __init__(self, halflife_rounds: float = DEFAULT_HALFLIFE_ROUNDS, priors: CostPriors | None = None) -> None:
        p = priors or CostPriors()
        d = decay_of(halflife_rounds)
        self.t_draft = EwLinear(d, prior_intercept=0.0, prior_slope=p.t_draft_s)
        self.t_edge = EwLinear(d, p.t_edge_s)
        self.t_net = EwLinear(d, p.t_net_s)
        self.e_radio = EwLinear(d, 0.0)  # the transfers' energy (the radio's gaps: `link`)
        self.e_link = Ewma(d, 0.0)
        self.t_link = Ewma(d, 0.0)
        self.power = EwPowerSplit(d, p.p_draft_w, p.p_wait_w)
        # When the meter was also read at the end of drafting, the split is measured directly.
        self.e_draft = Ewma(d, 0.0)
        self.t_drafting = Ewma(d, 0.0)
        self.e_wait = Ewma(d, 0.0)
        self.t_waiting = Ewma(d, 0.0)
        self.accept = Ewma(d, p.alpha)
        self.accept.update(p.alpha, p.alpha_weight)
        self.observed_drafts = 0
        self.rounds = 0

    def observe(self, tele: Telemetry) -> None:
        self.rounds += 1
        # Forwards this block's drafting time covers: carried drafts were drafted (and timed) in the
        # round before; a block drafted ahead with a guess drafted the guess too (one forward more,
        # which `chain_frame` prices itself: fitted as a draft, it would land in the intercept).
        fresh = tele.k - tele.carried + tele.guessed
        # Where the meter was read when drafting ended, the drafting phase is the interval that
        # reading covers (the thread hops around the forwards: a per-block cost, so the fit's
        # intercept takes them), and the round's `t_net_s` is the rest (with a pre-draft: to the
        # verdict's arrival, its overrun left out, which `predraft_pays` prices): one split of the
        # round for time and energy alike, so the estimates' energy adds up to the meter's.
        span = tele.t_drafted_s if math.isfinite(tele.t_drafted_s) else tele.t_draft_s
        if fresh > 0:
            self.t_draft.update(fresh, span)
        if tele.k > 0:
            observed = tele.accepted + (1 if tele.accepted < tele.k else 0)
            self.accept.update(tele.accepted / observed, float(observed))
            self.observed_drafts += observed
        self.t_edge.update(tele.k, tele.t_edge_queue_s + tele.t_edge_compute_s)
        if not tele.sent_ahead:
            # A block sent ahead waits at the edge behind the blocks before it, and that wait is
            # in its transport time: only blocks sent on their own measure the channel.
            self.t_net.update(tele.k, tele.t_net_s)
        if not (tele.stale_blocks or tele.stale_empty or tele.stale_bytes_down):
            # A miss's round also carries the bytes of the blocks it cut, and the round after it the
            # bytes of their stale verdicts; `chain_frame` prices both as waste itself: fitted in,
            # every block's radio would be charged them again.
            self.e_radio.update(tele.k, tele.e_radio_j - tele.e_radio_link_j)
        # The connected state's power: its joules over the round's time (a ratio of averages, so a
        # round whose gaps outlasted the radio's tail weighs in with what it was charged).
        if tele.t_round_s > 0 and math.isfinite(tele.e_radio_link_j):
            self.e_link.update(tele.e_radio_link_j)
            self.t_link.update(tele.t_round_s)
        if math.isfinite(tele.e_compute_j):
            drafting = tele.t_drafting_s if math.isfinite(tele.t_drafting_s) else tele.t_draft_s
            t_wait = max(tele.t_round_s - drafting, 0.0)
            self.power.update(drafting, t_wait, tele.e_compute_j)
            # The reading at the end of the block's drafting splits the round only when nothing
            # else was drafted in it (a pre-draft's energy would count as waiting), and only when
            # the block drafted something: a round of K = 0 "drafts" for microseconds, and a
            # meter's quantum in that span (RAPL's ~1 ms of energy at once) would be read as
            # drafting power. Each side's energy over the time it covers (over `t_draft_s` alone,
            # without the hops, drafting read dearer than it is).
            if fresh > 0 and math.isfinite(tele.e_draft_j) and drafting <= tele.t_draft_s:
                self.e_draft.update(tele.e_draft_j)
                self.t_drafting.update(span)
                self.e_wait.update(tele.e_compute_j - tele.e_draft_j)
                self.t_waiting.update(max(tele.t_round_s - span, 0.0))

    def _powers_w(self) -> tuple[float, float]:
        """Measured ratios (energy over time, each side of the drafting reading) where rounds had
        both; else the least-squares split of whole-round readings."""
        fit = self.power.powers_w()
        measured_draft = self.t_drafting.value > 0 and self.e_draft.weight > 0
        measured_wait = self.t_waiting.value > 0 and self.e_wait.weight > 0
        return (
            max(self.e_draft.value / self.t_drafting.value, 0.0) if measured_draft else fit[0],
            max(self.e_wait.value / self.t_waiting.value, 0.0) if measured_wait else fit[1],
        )

    def alpha_upper(self, z: float = 2.0) -> float:
        """α̂ at the upper end of its interval (`wilson_upper` over the observations' weight, the
        prior's pseudo-tokens included): what acceptance may still be, given how little was seen."""
        return min(wilson_upper(min(max(self.accept.value, 0.0), 1.0), self.accept.weight, z), 0.999)

    def model(self) -> CostModel:
        edge0, edge1 = self.t_edge.coefficients()
        net0, net1 = self.t_net.coefficients()
        radio0, radio1 = self.e_radio.coefficients()
        p_draft, p_wait = self._powers_w()
        draft0, draft1 = self.t_draft.coefficients()
        return CostModel(
            t_draft0_s=draft0,
            t_draft_s=draft1,
            t_edge0_s=edge0,
            t_edge_per_token_s=edge1,
            t_net0_s=net0,
            t_net_per_token_s=net1,
            p_draft_w=p_draft,
            p_wait_w=p_wait,
            e_radio0_j=radio0,
            e_radio_per_token_j=radio1,
            p_link_w=self.e_link.value / self.t_link.value if self.t_link.value > 0 else 0.0,
            alpha=min(max(self.accept.value, 0.0), 0.999),
        )
