"""Draft-length policies: how much to draft each round, and when to stop a block early.

Contract: `parse_policy(name, options)` returns a `Policy`. Before each round the loop calls
`decide(limit)` -> `Decision(k_ref, k_max)` (limit: what the edge, the context and max_new_tokens
allow this round) and `gate(decision)` -> a per-token stop rule or None (None: draft exactly k_ref);
after the verdict, `observe(tele)` with the round's full `Telemetry`. Every policy keeps the same
`Controller` state — cost estimates, entropy calibrator and, with a budget, the deficit queue — so
every trace carries Q and p̂, and only the decisions differ:

| name        | decision                                                                 |
|-------------|--------------------------------------------------------------------------|
| `fixed-K`   | K drafts every round (`fixed-0`: the edge decodes alone, one round trip per token) |
| `heuristic` | K += 2 after a fully accepted block, K −= 1 otherwise (transformers' schedule) |
| `entropy`   | up to K_max, stop after a token whose entropy exceeds τ                   |
| `adaedl`    | up to K_max, stop when 1 − sqrt(γ·H) < λ (AdaEDL)                         |
| `lyapunov`  | K_ref from the drift-plus-penalty objective (outer loop only)            |
| `gelato`    | K_ref, then the entropy-driven continuation rule up to K_max (outer + inner) |
| `ar-edge`   | the edge decodes alone and streams its tokens (no round trip per token)  |
| `ar-device` | the drafter alone (no edge; not quality-preserving: a reference point)   |

Pure decisions over `gelato.controller`: no I/O, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from gelato.controller import (
    CostEstimator,
    Decision,
    DeficitQueue,
    EntropyCalibrator,
    Objective,
    chain_frame,
    choose_chain_k,
    choose_k_ref,
    expected_emitted,
    keep_drafting,
    predraft_pays,
    tokens_per_s,
)
from gelato.controller.estimators import Ewma, decay_of
from gelato.device.policy_options import PolicyOptions
from gelato.types import DraftBlock, SparseDist, Telemetry

# The weight, in rounds, of `Controller.ahead_follow`'s starting value (1: chains start).
FOLLOW_PRIOR_ROUNDS = 3.0


@dataclass
class Controller:
    """Shared state: what every policy learns from each round."""

    options: PolicyOptions
    cost: CostEstimator = field(init=False)
    calibrator: EntropyCalibrator = field(init=False)
    queue: DeficitQueue | None = field(init=False)

    def __post_init__(self) -> None:
        self.cost = CostEstimator(self.options.halflife_rounds)
        self.calibrator = EntropyCalibrator(halflife_tokens=self.options.calibrator_halflife_tokens)
        # Of the fully accepted blocks, the share whose bonus was the drafter's own pick: the first
        # pre-draft (with send-ahead: the next block's guess, sent or dropped unsent), or where
        # nothing was drafted past the block, the pick checked in the next block's first forward
        # (`Telemetry.bonus_guess_hit`): measured whether or not the controller pipelines, so a low
        # rate that keeps it from pipelining is still corrected. Its prior weighs a few rounds: a
        # first miss alone would set it to 0.
        self.bonus_match = Ewma(decay_of(self.options.halflife_rounds), prior=0.6)
        self.bonus_match.update(0.6, weight=FOLLOW_PRIOR_ROUNDS)
        # Send-ahead: of the chances to start a chain (a block sent fresh, awaited alone, with a
        # drafting decision), the share the per-block check took. It starts at 1 with the weight of
        # a few rounds, so that one early refusal (an untrained calibrator) does not price chains
        # out at once: chains are tried before they are judged.
        self.ahead_follow = Ewma(decay_of(self.options.halflife_rounds), prior=1.0)
        self.ahead_follow.update(1.0, weight=FOLLOW_PRIOR_ROUNDS)
        b = self.options.budget_j_per_token
        self.queue = DeficitQueue(b) if b else None

    @property
    def q_j(self) -> float:
        return self.queue.q_j if self.queue else 0.0

    def p_hit(self, block_entropies: tuple[float, ...]) -> float:
        """P(a pre-draft after this block hits): the calibrated survival to the block's end times
        the chance that the target's next token is the drafter's (measured on full accepts)."""
        return self.calibrator.survival(block_entropies) * self.bonus_match.value

    def objective(self, k_max: int | None = None, hopeful: bool = False) -> Objective:
        """The objective now; `k_max`, the most drafts a round may have, lets it know when no
        choice fits the budget (`Objective.over_budget`). `hopeful`: with the acceptance at the upper
        end of its interval (`CostEstimator.alpha_upper`, for `Lyapunov._outer`)."""
        model = self.cost.model()
        if hopeful:
            model = replace(model, alpha=self.cost.alpha_upper())  # never below α̂ (`wilson_upper`)
        return Objective(model, self.options.v, self.q_j, self.options.budget_j_per_token, k_max)

    def observe(self, tele: Telemetry) -> float:
        if tele.predrafted and tele.accepted == tele.k:
            self.bonus_match.update(1.0 if tele.predraft_hit else 0.0)
        if tele.bonus_guess_hit is not None:  # the block before, checked for free (no pre-draft)
            self.bonus_match.update(1.0 if tele.bonus_guess_hit else 0.0)
        self.cost.observe(tele)
        self.calibrator.observe_block(tele.entropies, tele.accepted)
        return self.queue.update(tele.e_j, tele.emitted) if self.queue else 0.0


class Gate:
    """A per-token stop rule for one block; records p̂ of every drafted token for the trace."""

    def __init__(self, calibrator: EntropyCalibrator) -> None:
        self.calibrator = calibrator
        self.p_accept: list[float] = []

    def __call__(self, drafted: int, entropy: float, q: SparseDist | None) -> str | None:
        self.p_accept.append(self.calibrator.p_accept(entropy))
        return self.stop(drafted, entropy)

    def stop(self, drafted: int, entropy: float) -> str | None:
        return None


class _Threshold(Gate):
    def __init__(self, calibrator: EntropyCalibrator, max_entropy: float) -> None:
        super().__init__(calibrator)
        self.max_entropy = max_entropy

    def stop(self, drafted: int, entropy: float) -> str | None:
        return "entropy" if entropy > self.max_entropy else None


class _Continuation(Gate):
    """The inner loop: keep drafting while a continuation still beats stopping, with the survival S_i."""

    def __init__(self, calibrator: EntropyCalibrator, objective: Objective, k_ref: int, k_max: int) -> None:
        super().__init__(calibrator)
        self.objective, self.k_ref, self.k_max = objective, k_ref, k_max
        self.survival, self.n_expected = 1.0, 1.0

    def stop(self, drafted: int, entropy: float) -> str | None:
        self.survival *= self.p_accept[-1]
        self.n_expected += self.survival
        if drafted >= self.k_max or keep_drafting(self.objective, drafted, self.n_expected, self.survival, self.k_max):
            return None
        # Past K_ref the a-priori budget is spent; before it, the tokens' entropies ended the block.
        return "budget" if drafted >= self.k_ref else "entropy"


class Policy:
    name = "policy"
    local_only = False  # ar-device: no edge at all
    edge_streams = False  # ar-edge: the edge decodes alone and streams its tokens
    drafts = True  # False: it never drafts (K = 0 every round), so the drafter needs no prompt KV

    def __init__(self, options: PolicyOptions | None = None) -> None:
        self.options = options or PolicyOptions()
        self.controller = Controller(self.options)
        # Blocks in flight past the awaited one, set by the send-ahead loop for the generation it
        # runs (its link's `max_ahead`). None: rounds one at a time, also when `--pipeline
        # send-ahead` fell back to local pre-drafting on an edge without it.
        self.ahead_blocks: int | None = None

    def k_max(self, limit: int) -> int:
        return min(self.options.k_max, limit) if self.options.k_max else limit

    def decide(self, limit: int) -> Decision:
        raise NotImplementedError

    def gate(self, decision: Decision) -> Gate | None:
        return None

    def observe(self, tele: Telemetry) -> float:
        """Feedback after each verdict; returns the deficit Q after the round."""
        return self.controller.observe(tele)

    def predraft_depth(self, decision: Decision, block: DraftBlock, fits: int | None = None) -> int:
        """How many tokens to pre-draft while `block` is verified (0: none). Without a controller
        the whole next block's cap, at most `fits` (what the windows and max_new_tokens leave);
        the controller policies ask whether that depth pays."""
        if self.options.pipeline == "off" or block.k == 0:
            return 0
        depth = max(decision.k_max, block.k) + 1  # the first pre-draft is the target's own token
        return depth if fits is None else min(depth, max(fits, 0))

    def p_hit(self, block: DraftBlock) -> float:
        """P(the block after `block` is a hit): `block` fully accepted, its guess right."""
        return self.controller.p_hit(block.entropies)

    def send_ahead(self, decision: Decision, p_chain: float, first: bool = False) -> bool:
        """Send-ahead: draft and send the next block now, before the verdicts in flight? `p_chain`:
        the chance it is verified (every block in flight a hit); `first`: the awaited block was
        sent fresh and is alone in flight (this would start a chain). Without a controller: always."""
        return self.options.pipeline == "send-ahead"

    def end_chains(self) -> None:
        """The send-ahead loop's generation is over (however it ended): rounds one at a time again."""
        self.ahead_blocks = None

    def charge(self, e_j: float, tokens: int = 0) -> None:
        """Energy spent outside any round (a generation's start and end) into the queue, with
        `tokens` the rounds whose own energy was unmeasured delivered (their energy is in `e_j`)."""
        if self.controller.queue is not None and (e_j > 0 or tokens):
            self.controller.queue.update(max(e_j, 0.0), tokens)


class FixedK(Policy):
    def __init__(self, k: int, options: PolicyOptions | None = None) -> None:
        super().__init__(options)
        self.k = k
        self.name = f"fixed-{k}"
        self.drafts = k > 0

    def decide(self, limit: int) -> Decision:
        k = min(self.k, self.k_max(limit))  # `--k-max` caps it too
        return Decision(k, k, self.controller.q_j)


class Heuristic(Policy):
    name = "heuristic"

    def __init__(self, options: PolicyOptions | None = None) -> None:
        super().__init__(options)
        self.k = max(1, self.options.heuristic_start)
        self._ceiling = 0  # the largest cap any round had: `--k-max`, else the edge's block limit

    def decide(self, limit: int) -> Decision:
        # The schedule K stays within [1, the largest cap seen]. A round's own limit (a generation's
        # short last round, the room a send-ahead chain projects) caps only that round's block,
        # never K: the next round, and the next prompt (one policy serves them all), go on from K.
        self._ceiling = max(self._ceiling, self.k_max(limit))
        if self._ceiling:
            self.k = max(1, min(self.k, self._ceiling))
        k = min(self.k, self.k_max(limit))
        return Decision(k, k, self.controller.q_j)

    def observe(self, tele: Telemetry) -> float:
        if tele.k > 0:
            self.k = self.k + 2 if tele.accepted == tele.k else max(1, self.k - 1)
        return super().observe(tele)


class EntropyStop(Policy):
    name = "entropy"

    def decide(self, limit: int) -> Decision:
        k = self.k_max(limit)
        return Decision(k, k, self.controller.q_j)

    def gate(self, decision: Decision) -> Gate:
        return _Threshold(self.controller.calibrator, self.options.entropy_threshold)


class AdaEDL(EntropyStop):
    """Stop when the lower bound 1 − sqrt(γ·H) on acceptance falls below λ, i.e. H > (1 − λ)²/γ."""

    name = "adaedl"

    def gate(self, decision: Decision) -> Gate:
        o = self.options
        return _Threshold(self.controller.calibrator, (1.0 - o.adaedl_lambda) ** 2 / o.adaedl_gamma)


class Lyapunov(Policy):
    name = "lyapunov"

    def __init__(self, options: PolicyOptions | None = None) -> None:
        super().__init__(options)
        self._idle_rounds = 0
        # Why the last decision drafted although the estimates said K = 0 (`_outer`): "evidence"
        # (too few drafts verified to rule drafting out), "remeasure" (`explore_every_rounds`
        # rounds at K = 0), "" (it did not).
        self._explore = ""
        # The last decision's best score and token rate for rounds one at a time.
        self._round_score, self._round_rate = 0.0, 0.0
        # The per-block check's answer for a chain's start, folded into `ahead_follow` when the
        # next round is observed (so deciding stays a function of observed rounds).
        self._follow_seen: bool | None = None
        # The last decision's objective: the pre-draft and send-ahead checks that follow it (no
        # verdict is observed in between) score with it, over budget or not, as the decision did.
        self._objective = self.controller.objective()

    def _outer(self, limit: int) -> tuple[int, float, bool]:
        """K_ref from the objective (`_plan`). Drafting nothing observes no acceptance, so a low α̂
        that makes K = 0 the choice is never corrected by what follows: a cold start whose first
        few drafts were rejected stayed at K = 0 for most of a prompt, over budget, where K = 0
        was the dearest choice per token. So K = 0 is chosen on evidence only: until
        `min_observed_drafts` drafts were verified, a round α̂ would leave empty drafts the best
        K ≥ 1 for what acceptance may still be (the upper end of its interval,
        `CostEstimator.alpha_upper`), and observes. Later, every `explore_every_rounds` rounds
        without drafting a block of `explore_k` is drafted all the same (acceptance and costs
        drift). `self._explore` names which of the two overrode the estimates ("" if neither); the
        last value returned: whether K_ref is a chain's."""
        k_cap = self.k_max(limit)
        k_ref, score, chained = self._plan(self.controller.objective(k_cap), k_cap)
        self._explore = ""
        if k_ref == 0 and k_cap > 0 and self.controller.cost.observed_drafts < self.options.min_observed_drafts:
            k_ref, score, chained = self._plan(self.controller.objective(k_cap, hopeful=True), k_cap, k_min=1)
            self._explore = "evidence"
        if k_ref == 0 and limit > 0 and self._idle_rounds >= self.options.explore_every_rounds - 1:
            k_ref, self._explore = min(self.options.explore_k, k_cap), "remeasure"
        return k_ref, score, chained

    def _plan(self, obj: Objective, k_cap: int, k_min: int = 0) -> tuple[int, float, bool]:
        """The best choice under `obj`, K_ref ≥ `k_min`: (K_ref, its score, whether it is a chain's).
        With send-ahead running (`self.ahead_blocks`), a chain's block size where chains score
        better than rounds one at a time (`choose_chain_k`, a chain priced as starting as often as
        the per-block check lately started one: `Controller.ahead_follow`). Keeps `obj` in
        `self._objective`, and the score and token rate of rounds one at a time in
        `self._round_score` and `self._round_rate`."""
        self._objective = obj
        k_ref, score = choose_k_ref(obj, k_cap, k_min)
        self._round_score = score
        self._round_rate = tokens_per_s(expected_emitted(obj.cost.alpha, k_ref), obj.cost.time_s(k_ref))
        if self.ahead_blocks is not None:
            c = self.controller
            k_chain, chain_score = choose_chain_k(
                obj, k_cap, c.bonus_match.value, self.ahead_blocks, self._round_rate, c.ahead_follow.value
            )
            if chain_score > score:
                return k_chain, chain_score, True
        return k_ref, score, False

    def end_chains(self) -> None:
        super().end_chains()
        self._follow_seen = None  # its round was never observed (the generation ended or failed)

    def observe(self, tele: Telemetry) -> float:
        # Counted on observed rounds, so deciding stays a pure function of what was observed: a
        # round lost with its edge (failover) is decided again exactly as it was.
        self._idle_rounds = self._idle_rounds + 1 if tele.k == 0 else 0
        if self._follow_seen is not None:
            self.controller.ahead_follow.update(1.0 if self._follow_seen else 0.0)
            self._follow_seen = None
        return super().observe(tele)

    def decide(self, limit: int) -> Decision:
        k_ref, score, _ = self._outer(limit)
        return self._decision(k_ref, k_ref, score)

    def _decision(self, k_ref: int, k_max: int, score: float) -> Decision:
        """The decision with the objective's view of it, for the trace."""
        obj = self._objective
        expected_j = obj.cost.energy_j(k_ref) / expected_emitted(obj.cost.alpha, k_ref)
        return Decision(k_ref, k_max, self.controller.q_j, score, obj.over_budget, expected_j, self._explore)

    def predraft_depth(self, decision: Decision, block: DraftBlock, fits: int | None = None) -> int:
        depth = super().predraft_depth(decision, block, fits)
        if depth == 0:
            return 0
        c, obj = self.controller, self._objective
        n = 1.0 + sum(c.calibrator.survival(block.entropies[: i + 1]) for i in range(block.k))
        # The next block is priced as long as this one: it keeps no more of the pre-draft.
        return depth if predraft_pays(obj, block.k, n, c.p_hit(block.entropies), depth, block.k) else 0

    def send_ahead(self, decision: Decision, p_chain: float, first: bool = False) -> bool:
        """Only if a chain that goes on with this block's own chance (`p_chain`, from the blocks in
        flight) still beats rounds one at a time. A chain's start (`first`) is counted into
        `ahead_follow`, which the outer decision prices chains with."""
        if not super().send_ahead(decision, p_chain, first):
            return False
        if decision.k_ref == 0:
            return False
        ahead = self.options.ahead_blocks if self.ahead_blocks is None else self.ahead_blocks
        obj = self._objective
        n, t, e = chain_frame(obj, decision.k_ref, p_chain, ahead)
        go = tokens_per_s(n, t) > self._round_rate and obj.score_of(n, t, e) > self._round_score
        if first:
            self._follow_seen = go
        return go


class Gelato(Lyapunov):
    name = "gelato"

    def decide(self, limit: int) -> Decision:
        k_ref, score, chained = self._outer(limit)
        # The inner rule with nothing drafted yet is the outer decision: K_ref = 0 drafts nothing.
        # A chain's block size caps it: the inner rule scores rounds one at a time, whose best K
        # is longer, and would draft past the size the chain was priced (and chosen) for; an
        # uncertain token still ends the block early.
        # A block drafted every `explore_every_rounds` to re-measure is drafted whole: cut short
        # by a rule that thinks drafting does not pay, it would measure next to nothing.
        cap = k_ref if chained or self._explore == "remeasure" else self.k_max(limit)
        return self._decision(k_ref, cap if k_ref else 0, score)

    def gate(self, decision: Decision) -> Gate:
        # The decision's own objective, over budget too (`Objective.over_budget`): the per-token
        # rule then drafts a token while its expected joules per expected token stay below λ, and
        # with nothing drafted it is the outer decision, as always. An "evidence" round was planned
        # with the upper end of α̂'s interval (`_outer`): the rule prices the drafts to come so too.
        if decision.explore == "remeasure":
            return Gate(self.controller.calibrator)  # the re-measuring block: no early stop
        return _Continuation(self.controller.calibrator, self._objective, decision.k_ref, decision.k_max)


class ArDevice(Policy):
    name = "ar-device"
    local_only = True

    def decide(self, limit: int) -> Decision:
        k = min(self.options.ar_device_block, limit)
        return Decision(k, k, self.controller.q_j)


class ArEdge(Policy):
    """The edge decodes alone and streams its tokens in one session: no round trip per token (the
    honest "cloud only" reference; `fixed-0` pays one round trip per token)."""

    name = "ar-edge"
    edge_streams = True
    drafts = False

    def decide(self, limit: int) -> Decision:
        return Decision(0, 0, self.controller.q_j)


POLICY_NAMES = ("fixed-K", "heuristic", "entropy", "adaedl", "lyapunov", "gelato", "ar-edge", "ar-device")
_NAMED: dict[str, type[Policy]] = {
    "heuristic": Heuristic,
    "entropy": EntropyStop,
    "adaedl": AdaEDL,
    "lyapunov": Lyapunov,
    "gelato": Gelato,
    "ar-device": ArDevice,
    "ar-edge": ArEdge,
}


def parse_policy(text: str, options: PolicyOptions | None = None) -> Policy:
    name = text.strip()
    m = re.fullmatch(r"fixed-(\d+)", name)
    if m:
        return FixedK(int(m.group(1)), options)
    if name in _NAMED:
        return _NAMED[name](options)
    if name == "oracle":
        raise ValueError(
            "'oracle' is an offline bound computed from recorded runs: python -m gelato.benchmarks.simulate"
        )
    raise ValueError(f"unknown policy {text!r}; available: {', '.join(POLICY_NAMES)} (fixed-K: K >= 0, e.g. fixed-4)")
