"""The drift-plus-penalty objective and the two decisions made with it.

Glossary
- N: tokens a round emits (accepted drafts + the target's token); N̂(K) = (1 − α̂^{K+1}) / (1 − α̂).
- T̂(K), Ê(K): a round's expected time and device energy when it drafts K tokens (`CostModel`).
- Q: the energy-deficit queue (J); ē: the budget (J/token); V: the throughput weight.

Throughput is a ratio of sums (ΣN/ΣT), so each round maximises the renewal-frame ratio

    score = [ (V + Q̃)·N − Q̃·Ẽ ] / T̂,   with Q̃ = Q/ē and Ẽ = Ê/ē (both in tokens of budget).

This is the drift-plus-penalty ratio `[(V′ + Q·ē)·N̂ − Q·Ê] / T̂` divided by ē², with V = V′/ē²:
the classic V′ (in J²) is this V·ē². So V is a count of tokens of budget and one default fits any
budget; with Q = 0 the score is V·N̂/T̂ (pure throughput), and as Q grows energy weighs more.
Without a budget (no energy control) the score is N̂/T̂, and V plays no part.

Over budget: when every K the device may draft (0..K_max) costs more per token than ē by the model
(`cheapest_k`), the queue can only grow, whatever is chosen. The ratio score would then prefer what
grows it slowest per *second* — short rounds, K = 0 in the limit, the dearest per token — and the
long-run J/token would drift furthest from ē (a live lyapunov run whose device had slowed down
drafted nothing in 284 of 770 rounds, at the highest J/token of any K). With Q > 0 the score is then
λ·N̂ − Ê instead, λ the fewest joules per token the model allows (`cheapest_k`): the long-run
ΣE/ΣN is least when each round maximises λ·N − E at the least achievable λ (Dinkelbach), so the
outer choice is the cheapest K, the inner rule drafts a token while its expected joules per
expected token stay below λ, and chains and pre-drafts are priced the same way
(`Objective.over_budget`). λ is the cheapest *fixed* K's, so it is no lower than what blocks that
stop on doubt achieve (the simulator's comparison with the ratio score: README, "Controller").

- Outer loop, `choose_k_ref`: K_ref = argmax over K ∈ 0..K_max of the score with the a-priori N̂(K).
- With send-ahead (`chain_frame`): a chain of K-draft blocks replaces the round where its frame
  scores better (`choose_chain_k`), the frame mixed with a lone round of K by how often a chain
  really starts (`follow`).
- Inner loop, `keep_drafting`: after drafting i tokens whose calibrated acceptances give the
  survival S_i and the expected emission n_i = 1 + Σ_{j≤i} S_j, draft token i+1 only if some
  continuation (i+m tokens, future ones at the prior α̂) scores better than stopping now. With no
  token drafted yet (S_0 = 1) this is exactly the outer decision, so the inner loop refines K_ref:
  an uncertain token ends the block early, a confident run extends it up to K_max.
Pure arithmetic; K_max is small (≤ the edge's block limit), so enumeration is exact and cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gelato.controller.estimators import CostModel

# A relative fall of the score larger than this is real, not rounding (float64: ~1e-16).
_FALL = 1e-9


def expected_emitted(alpha: float, k: int) -> float:
    """N̂(K) = 1 + α + … + α^K, tokens a K-draft round emits at per-token acceptance α."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class Decision:
    """What the policy decided before a round: the reference budget and the hard cap; for the
    trace, the objective's view (controller policies): whether it was over budget and the joules per
    token it expected of K_ref (Ê/N̂), to set against what the round then cost, and whether the round
    drafts to observe acceptance where the estimates alone would draft nothing. An "evidence" round
    is planned with acceptance at the upper end of its interval, and its score, over-budget flag
    and J/token are that plan's (optimistic) view."""

    k_ref: int
    k_max: int
    q_j: float = 0.0
    score: float = math.nan
    over_budget: bool = False
    j_per_token_model: float = math.nan
    # Why it drafts although the estimates say K = 0 ("" if they do not): "evidence", too few drafts
    # verified yet to rule drafting out; "remeasure", the periodic block after rounds at K = 0.
    explore: str = ""


def cheapest_k(cost: CostModel, k_max: int) -> tuple[int, float]:
    """The K in 0..k_max with the fewest expected joules per emitted token, Ê(K)/N̂(K), and that
    J/token; ties go to the smaller K. Enumerated: k_max is small."""
    per_token = [cost.energy_j(k) / expected_emitted(cost.alpha, k) for k in range(k_max + 1)]
    best = min(range(k_max + 1), key=per_token.__getitem__)
    return best, per_token[best]


class Objective:
    """The score of rounds under one snapshot of the estimates and the queue. `k_max`: the most
    drafts the device may choose, which decides whether it is over budget (module docstring);
    None: never over budget (the ratio score always)."""

    def __init__(
        self,
        cost: CostModel,
        v: float = 1.0,
        q_j: float = 0.0,
        budget_j_per_token: float | None = None,
        k_max: int | None = None,
    ) -> None:
        self.cost = cost
        self.v = v
        self.budget = budget_j_per_token or None  # 0: no budget, as the controller's queue reads it
        self.q_tokens = q_j / budget_j_per_token if budget_j_per_token else 0.0
        self._geo: list[float] = [0.0]  # Σ_{l=1..m} α^l, grown on demand
        self.least_j_per_token = math.nan  # of the cheapest K, needed only with a budget and a backlog
        if k_max is not None and budget_j_per_token and self.q_tokens > 0:
            self.least_j_per_token = cheapest_k(cost, k_max)[1]
        self.over_budget = self.least_j_per_token > (budget_j_per_token or math.inf)  # NaN: never

    def score(self, n_expected: float, k: int) -> float:
        return self.score_of(n_expected, self.cost.time_s(k), self.cost.energy_j(k))

    def score_of(self, n_expected: float, t_s: float, e_j: float) -> float:
        """The score of a round emitting `n_expected` tokens in `t_s` seconds for `e_j` joules."""
        if self.over_budget:
            return self.least_j_per_token * n_expected - e_j
        if self.budget is None:
            numerator = n_expected
        else:
            numerator = (self.v + self.q_tokens) * n_expected - self.q_tokens * e_j / self.budget
        if t_s <= 0:  # fits with both intercepts at 0 price K = 0 at no time: its sign decides
            return math.copysign(math.inf, numerator) if numerator else 0.0
        return numerator / t_s

    def geometric(self, m: int) -> float:
        a = self.cost.alpha
        while len(self._geo) <= m:
            self._geo.append(self._geo[-1] + a ** len(self._geo))
        return self._geo[m]


def choose_k_ref(obj: Objective, k_max: int, k_min: int = 0) -> tuple[int, float]:
    """The outer decision: (K_ref, its score) over K ∈ k_min..k_max (k_min ≤ k_max); ties go to
    the smaller K (less energy at risk).

    Over K ≥ 1 the score is quasi-concave in K: its numerator is concave (N̂ is, Ê is affine) and
    T̂ is affine and positive there, so each superlevel set {numerator − c·T̂ ≥ 0} is an interval.
    Over budget the score λ·N̂ − Ê is concave. Once it really falls (by more than rounding) it never
    climbs back above its peak, and the search stops there: a few scores instead of K_max. K = 0
    (no drafting step) is scored apart."""
    best_k, best = (0, obj.score(1.0, 0)) if k_min <= 0 else (0, -math.inf)
    peak = -math.inf
    for k in range(max(k_min, 1), k_max + 1):
        s = obj.score(expected_emitted(obj.cost.alpha, k), k)
        if s > best:
            best_k, best = k, s
        if s < peak - _FALL * abs(peak):
            break
        peak = max(peak, s)
    return best_k, best


def predraft_pays(
    obj: Objective, k: int, n_expected: float, p_hit: float, depth: int, next_k: int | None = None
) -> bool:
    """Pre-drafting while a k-draft block is in flight (pipelining): up to `depth` tokens are
    drafted during the wait, the first is wasted even on a hit (it is the target's own token), the
    rest start the next block and save their drafting time with probability `p_hit` — as many as
    that block keeps (`next_k` drafts at most; None: all of them): the rest are dropped. The extra
    energy is drafting instead of idling, paid whether it hits or not (on a hit the next round no
    longer drafts the tokens it keeps, which returns their drafting energy). The verdict stops the
    pre-draft only after the token in progress, so unless `depth` ends it first, the last token
    overruns the wait: the round is longer by that overrun (at a short wait, a good part of a
    forward), whatever the outcome. Charged to this round, the same score decides: pre-draft only
    if it is higher."""
    c = obj.cost
    if depth < 2 or c.t_draft_s <= 0:
        return False
    wait = c.wait_s(k)
    m = min(depth, math.ceil(wait / c.t_draft_s))  # tokens started before the verdict arrives
    if m < 2:
        return False
    overrun_s = max(m * c.t_draft_s - wait, 0.0)
    t, e = c.time_s(k), c.energy_j(k)
    kept = m - 1 if next_k is None else min(m - 1, next_k)
    saved_s = p_hit * kept * c.t_draft_s
    # A hit shortens the next round by `saved_s`: its drafting and the radio's connected state then.
    extra_j = m * c.t_draft_s * (c.p_draft_w - c.p_wait_w) - saved_s * (c.p_draft_w + c.p_link_w)
    extra_j += overrun_s * (c.p_wait_w + c.p_link_w)  # the overrun drafts past the wait it replaced
    return obj.score_of(n_expected, t + overrun_s - saved_s, e + extra_j) > obj.score_of(n_expected, t, e)


def chain_frame(obj: Objective, k: int, cont: float, ahead: int) -> tuple[float, float, float]:
    """Send-ahead as a renewal frame: (N, T, E) expected of one chain of k-draft blocks. The first
    block costs a whole round T̂(k); each block after it is verified with probability `cont` (the
    one before fully accepted and its guess right: α̂^k × the guess-match rate on average) and
    then costs one step — its own drafting, the edge's time, or the round shared by the `ahead` + 1
    blocks in flight, whichever is longest. A miss ends the chain and wastes the blocks in flight
    after it (drafting power instead of idling, their bytes). Every block emits N̂(k) (Wald: the
    chain stops on what it has observed)."""
    c = obj.cost
    cont = min(max(cont, 0.0), 0.999)
    more = cont / (1.0 - cont)  # expected blocks verified after the first
    draft_next = c.draft_s(k + 1)  # the guess + k drafts
    edge = c.t_edge0_s + k * c.t_edge_per_token_s
    step = max(draft_next, edge, c.time_s(k) / (1 + ahead))
    n = expected_emitted(c.alpha, k) * (1.0 + more)
    t = c.time_s(k) + more * step
    e_step = draft_next * c.p_draft_w + max(step - draft_next, 0.0) * c.p_wait_w + step * c.p_link_w
    e_step += c.e_radio0_j + k * c.e_radio_per_token_j
    waste = ahead * draft_next * (c.p_draft_w - c.p_wait_w) + ahead * (c.e_radio0_j + k * c.e_radio_per_token_j)
    return n, t, c.energy_j(k) + more * e_step + waste


def tokens_per_s(n_expected: float, t_s: float) -> float:
    """A frame's emission rate; a frame priced at no time (fits with every time at 0, as a replayed
    or synthetic trace can give) counts as 1 ns, so it ranks fastest instead of dividing by 0."""
    return n_expected / max(t_s, 1e-9)


def choose_chain_k(
    obj: Objective, k_max: int, match: float, ahead: int, min_rate: float = 0.0, follow: float = 1.0
) -> tuple[int, float]:
    """Send-ahead's outer decision: the block size (>= 1) whose chain frame scores best among the
    chains emitting faster than `min_rate` tokens/s (rounds one at a time: pipelining is for speed,
    and a slower chain that claims to save energy rests on costs the model does not see, such as
    each message's own processing), and its score; (0, -inf) when no chain qualifies.

    `follow`: the share of blocks after which the per-block check (`Lyapunov.send_ahead`, on that
    block's own entropies) does start a chain. A block it refuses is a round one at a time of the
    same size, so a choice of k is a chain with probability `follow` and a lone round of k
    otherwise (renewal frames mixed). Without this, k would be sized for chains that the check
    then mostly refuses: short blocks sent one at a time, slower and dearer than the round choice."""
    best_k, best = 0, -math.inf
    c = obj.cost
    for k in range(1, k_max + 1):
        n, t, e = chain_frame(obj, k, c.alpha**k * match, ahead)
        if follow < 1.0:
            lone = (expected_emitted(c.alpha, k), c.time_s(k), c.energy_j(k))
            n, t, e = (follow * x + (1.0 - follow) * y for x, y in zip((n, t, e), lone, strict=True))
        s = obj.score_of(n, t, e)
        if tokens_per_s(n, t) > min_rate and s > best:
            best_k, best = k, s
    return best_k, best


def keep_drafting(obj: Objective, drafted: int, n_expected: float, survival: float, k_max: int) -> bool:
    """The inner decision after `drafted` tokens: does drafting more still improve the score?"""
    stop = obj.score(n_expected, drafted)
    for m in range(1, k_max - drafted + 1):
        if obj.score(n_expected + survival * obj.geometric(m), drafted + m) > stop:
            return True
    return False
