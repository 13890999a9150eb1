"""p̂(accept | entropy): the inner loop's risk model, learned online from verdicts.

Contract: `EntropyCalibrator.observe_block(entropies, accepted)` learns from one verdict: the first
`accepted` drafts were accepted, the next one (if any) was rejected, and every draft after the
first rejection is *unobserved* — the target never judged it — so it is left out rather than
counted as a rejection (counting it would teach the calibrator that late tokens are bad, whatever
their entropy). `p_accept(h)` is then the probability that a draft of entropy `h` nats is accepted,
given that every draft before it in the block was. `survival(hs)` multiplies these: S_i.

Model: entropy bins (edges in nats) with a Beta prior per bin whose mean is the running overall
acceptance and whose weight is `prior_tokens` pseudo-observations, so an empty bin answers the
overall rate and a full one its own. Counts decay with a half-life in observed tokens, so the
calibration follows a drift in the prompts. The fitted values are made non-increasing in entropy
by isotonic regression weighted by each bin's observations (pool-adjacent-violators): a more
uncertain drafter is never trusted more, and a bin with no data, pooled with observed ones, takes
their value rather than pulling them towards the overall rate. Pure arithmetic.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# Bin edges in nats: fine near zero, where a confident drafter's tokens live, coarse in the tail.
DEFAULT_EDGES_NATS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.5, 6.5)
# Counts halve every this many observed drafts. A tail bin sees a few % of the drafts, so it needs
# thousands of them to hold a usable count; the price is following a new kind of prompt only within
# a few thousand tokens (the estimators' α̂ follows in ~20 rounds). `--calibrator-halflife-tokens`.
DEFAULT_CALIBRATOR_HALFLIFE_TOKENS = 4000.0


def isotonic_non_increasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares fit that never increases from left to right (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            wt = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / wt if wt > 0 else (m1 + m2) / 2, wt, c1 + c2])
    out: list[float] = []
    for m, _, c in blocks:
        out.extend([m] * int(c))
    return out


class EntropyCalibrator:
    def __init__(
        self,
        edges_nats: Sequence[float] = DEFAULT_EDGES_NATS,
        prior_alpha: float = 0.6,
        prior_tokens: float = 4.0,
        halflife_tokens: float = DEFAULT_CALIBRATOR_HALFLIFE_TOKENS,
        monotone: bool = True,
    ) -> None:
        if list(edges_nats) != sorted(edges_nats):
            raise ValueError("calibrator bin edges must be increasing")
        if not 0.0 < prior_alpha < 1.0 or prior_tokens <= 0 or halflife_tokens <= 0:
            raise ValueError("calibrator: need 0 < prior_alpha < 1, prior_tokens > 0, halflife_tokens > 0")
        self.edges = tuple(edges_nats)
        self.prior_tokens = prior_tokens
        self.halflife_tokens = halflife_tokens
        self.monotone = monotone
        n = len(self.edges) + 1
        self.accepted = [0.0] * n
        self.observed = [0.0] * n
        self._all_acc, self._all_obs = prior_alpha * prior_tokens, prior_tokens
        self._fit: list[float] = [prior_alpha] * n

    def bin_of(self, entropy_nats: float) -> int:
        return bisect.bisect_right(self.edges, entropy_nats)

    def observe_block(self, entropies: Sequence[float], accepted: int) -> None:
        n_obs = min(len(entropies), accepted + 1)
        if n_obs == 0:
            return
        decay = 0.5 ** (n_obs / self.halflife_tokens)
        self.accepted = [a * decay for a in self.accepted]
        self.observed = [o * decay for o in self.observed]
        self._all_acc *= decay
        self._all_obs *= decay
        for i, h in enumerate(entropies[:n_obs]):
            b = self.bin_of(h)
            ok = 1.0 if i < accepted else 0.0
            self.accepted[b] += ok
            self.observed[b] += 1.0
            self._all_acc += ok
            self._all_obs += 1.0
        self._refit()

    @property
    def overall(self) -> float:
        return self._all_acc / self._all_obs

    def _refit(self) -> None:
        mu, s = self.overall, self.prior_tokens
        means = [(a + s * mu) / (o + s) for a, o in zip(self.accepted, self.observed, strict=True)]
        # Weighted by observations only: the prior's pseudo-tokens would give an empty bin (holding
        # mu) the weight to pull its observed neighbours towards mu when the two are pooled. With an
        # easy workload (mu ~0.97), 12 tokens at 5 nats of which 1 accepted were fitted 0.44, not ~0.3,
        # because the empty bin above them pooled its 0.97 into theirs. An empty bin now takes the
        # value of the observed ones it is pooled with.
        self._fit = isotonic_non_increasing(means, self.observed) if self.monotone else means

    def p_accept(self, entropy_nats: float) -> float:
        return self._fit[self.bin_of(entropy_nats)]

    def survival(self, entropies: Sequence[float]) -> float:
        s = 1.0
        for h in entropies:
            s *= self.p_accept(h)
        return s

    def table(self) -> list[dict[str, float]]:
        """The current calibration, bin by bin (for traces and plots)."""
        lows = (0.0, *self.edges)
        highs = (*self.edges, float("inf"))
        return [
            {"h_low": lo, "h_high": hi, "observed": o, "accepted": a, "p_hat": p}
            for lo, hi, o, a, p in zip(lows, highs, self.observed, self.accepted, self._fit, strict=True)
        ]
