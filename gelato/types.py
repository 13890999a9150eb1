"""Typed dataclasses at the device/edge boundary and the session-level sampling parameters.

Contract: these are the only shapes that cross between the draft loop, the wire codec
(`gelato.wire`) and the verifier. Token ids are plain ints; sparse draft distributions carry the
exact probabilities the device sampled from.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# 2: the tokenizer fingerprint covers how text becomes ids (`gelato.models.tokenizer_fingerprint`);
# 3: it leaves out what never changes an id and covers split_special_tokens. A device of another
# protocol would be refused as a tokenizer mismatch, so the version says it instead.
PROTOCOL_VERSION = 3
MAX_FLOAT32 = 3.4028234663852886e38  # the largest finite float32 (the wire's floats)


def as_float32(x: float) -> float:
    """`x` as the wire's float32 carries it."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of the target (edge) and of the drafter (device). temperature == 0: greedy;
    otherwise finite and >= MIN_TEMPERATURE. top_p in [0, 1] (0 and 1: off; NaN, inf and
    negatives are refused, never read as "off"). top_k == 0: off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    # Smallest positive temperature accepted (unannotated: a constant, not a field). Below it
    # sampling is greedy in all but name, and tiny divisors are where NaNs came from (1e-38 made
    # logits +-inf). The wire carries float32, whose value nearest 1e-4 lies just below it: the
    # check allows for that rounding.
    MIN_TEMPERATURE = 1e-4

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field. Every comparison is written so that NaN fails it."""
        t = self.temperature
        # The wire carries float32 (finite up to ~3.4e38), uint32 top_k and uint64 seed: what does
        # not fit is refused here, at settings time, not by the encoder for every prompt.
        low = self.MIN_TEMPERATURE * (1 - 2**-20)
        # Checked as the float32 the edge gets too: just above the bound here can round below it there.
        if not (t == 0.0 or (low <= t <= MAX_FLOAT32 and as_float32(t) >= low)):
            raise ValueError(
                f"temperature must be 0 (greedy) or finite (as float32) and >= {self.MIN_TEMPERATURE:g}, got {t}"
            )
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if 0.0 < self.top_p < 1.0 and not 0.0 < as_float32(self.top_p) < 1.0:
            # The edge would read it as 0 or 1 (off), while the drafter truncated: refused, not switched off.
            raise ValueError(
                f"top_p {self.top_p} is 'off' once on the wire (float32 {as_float32(self.top_p):g}): give 0 or 1 "
                "for off, or a value float32 keeps inside (0, 1), from 1.5e-45 to 0.99999994"
            )
        if not 0 <= self.top_k < 2**32:
            raise ValueError(f"top_k must be in [0, 2^32), got {self.top_k}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")


@dataclass(frozen=True)
class SessionOpen:
    """A device's request to open a session (`OpenSession` on the wire): the prefix the target
    prefills (the prompt, or prompt + accepted tokens when re-opening), its sampling and how many
    tokens it may add (0: up to the context limit), with what the edge checks it against."""

    prefix_ids: tuple[int, ...]
    tokenizer_fingerprint: str
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 0
    drafter_model: str = ""  # named in mismatch errors
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class SessionInfo:
    """The edge's answer to `SessionOpen` (`SessionOpened` on the wire): its limits for this session.
    `max_ahead_rounds`: how many send-ahead blocks past the last verdict it verifies (0: none);
    `empty_ahead`: whether it verifies empty send-ahead blocks (`DraftBlock.follow`);
    `eos_token_ids`: the target's end tokens, where a generation ends (() for a target that has
    none: it ends at its limits; None: an older edge did not say)."""

    session_id: str
    target_model: str
    context_limit: int
    max_draft_tokens: int
    max_ahead_rounds: int = 0
    empty_ahead: bool = False
    eos_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EdgeInfo:
    """What an edge says about itself (`Info` on the wire): the target, its limits and its load.
    `kv_*_bytes`: KV memory of open sessions (in use / reserved by admission), the admission budget
    (0: none) and what the slot pool holds; `max_ahead_rounds`: send-ahead depth (0: none)."""

    protocol_version: int
    target_model: str
    tokenizer_fingerprint: str
    vocab_size: int
    context_limit: int
    max_draft_tokens: int
    max_sessions: int
    active_sessions: int
    eos_token_ids: tuple[int, ...]
    kv_bytes_in_use: int = 0
    kv_bytes_reserved: int = 0
    kv_budget_bytes: int = 0
    kv_pool_bytes: int = 0
    max_ahead_rounds: int = 0


@dataclass(frozen=True)
class SparseDist:
    """A draft distribution q over a sparse support: q(ids[j]) = probs[j] / sum(probs)."""

    ids: tuple[int, ...]
    probs: tuple[float, ...]

    def prob_of(self, token: int) -> float:
        total = sum(self.probs)
        for i, p in zip(self.ids, self.probs, strict=True):
            if i == token:
                return p / total
        return 0.0


@dataclass(frozen=True)
class DraftBlock:
    """k drafted tokens for one round; q has one entry per token when sampling, none when greedy."""

    round: int
    ids: tuple[int, ...]
    q: tuple[SparseDist, ...] = ()
    # Device-side only, never sent: drafting time and the drafter's entropy (nats) per token.
    draft_s: float = 0.0
    entropies: tuple[float, ...] = ()
    stop_reason: str = ""  # why drafting stopped early: a policy's reason or "eos"; "" = reached k
    carried: int = 0  # leading drafts pre-drafted during the previous round trip (pipelining)
    # Send-ahead: the device's guess of the previous round's target token, which `ids` follow. The
    # block is sent before that round's verdict; on the wire it is [guess, *ids], parent round - 1.
    guess: int | None = None
    # Send-ahead with nothing of the device's in it (no guess, no ids): the target's next token
    # after whatever the previous round gives, so it is verified whenever that round is. On the
    # wire: no ids, parent round - 1.
    follow: bool = False
    # Device-side, pipelining only: after a fully accepted block that nothing was drafted after
    # (no pre-draft token, no block sent ahead or dropped unsent), whether the drafter's own pick
    # for that block's target token was that token, read off the extra row this block's first
    # forward computes anyway (`Drafter._forward_checking_guess`); None: not checked.
    bonus_guess_hit: bool | None = None

    @property
    def k(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Verdict:
    """The edge's answer to one DraftBlock: a accepted drafts plus one target token."""

    round: int
    n_accepted: int
    next_token: int
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_rows: int = 1
    stale: bool = False  # a send-ahead block the edge did not verify (its guess or parent missed)
    # Streamed decoding (Generate) only: the next rounds' tokens, sent in this round's message
    # (`gelato.wire.join_streamed` / `split_streamed`); empty for every verdict of a draft block.
    more_tokens: tuple[int, ...] = ()

    def emitted(self, draft_ids: tuple[int, ...]) -> list[int]:
        """Tokens this round appends to the sequence: accepted drafts then the target token."""
        return [*list(draft_ids[: self.n_accepted]), self.next_token]


@dataclass(frozen=True)
class Telemetry:
    """One round as the device measured it (one JSON line of `--trace`). Energy is NaN when the
    meter cannot read: never 0 J. t_net_s is what is left of the round after drafting, the edge's
    queue + compute and applying the verdict: transport both ways; with a pre-draft (or send-ahead)
    it is measured to the verdict's arrival instead, so the pre-draft's overrun past the verdict
    (its last forward) is in the round but not in t_net_s."""

    round: int
    k: int
    accepted: int
    emitted: int
    t_round_s: float
    t_draft_s: float
    t_net_s: float
    t_edge_queue_s: float
    t_edge_compute_s: float
    e_compute_j: float
    e_radio_j: float
    e_j: float
    bytes_up: int
    bytes_down: int
    energy_source: str
    energy_kind: str
    # Controller view of the round: the deficit Q after the round (J; None without a
    # budget), the policy's reference budget and hard cap, why the block ended (budget, entropy,
    # cap, eos, length), and each draft's entropy (nats) and calibrated acceptance p̂.
    q_deficit_j: float | None = None
    e_draft_j: float = float("nan")  # meter delta while drafting (part of e_compute_j); NaN: not read
    # Seconds from the round's start to that reading: the interval `e_draft_j` covers (the hop to
    # the drafter thread and back included, which `t_draft_s` leaves out); NaN: not read.
    t_drafted_s: float = float("nan")
    # Part of e_radio_j: the radio's connected state between this round's transfers (its tail
    # power over each gap, up to the profile's tail time); the rest is the transfers' own energy.
    # It grows with the round's time, not its bytes.
    e_radio_link_j: float = 0.0
    k_ref: int = 0
    k_max: int = 0
    # The objective's view of the decision (controller policies; False / NaN otherwise): whether
    # every K cost more than the budget by its estimates (the over-budget rule), and the joules per
    # token it expected of K_ref; whether it drafted only to observe acceptance (`explore`).
    over_budget: bool = False
    j_per_token_model: float = float("nan")
    explore: str = ""  # why it drafted where the estimates said K = 0: "evidence" or "remeasure"
    stop_reason: str = ""
    entropies: tuple[float, ...] = ()
    p_accept: tuple[float, ...] = ()
    # Pipelining (`--pipeline local`): tokens pre-drafted while this round's verdict was in flight,
    # whether they start the next block (hit: all accepted and the target's token was the first of
    # them), and how many of this block's drafts came from the previous round's pre-draft.
    predrafted: int = 0
    predraft_hit: bool = False
    carried: int = 0
    # Pipelining: the previous block's guess check (`DraftBlock.bonus_guess_hit`), made while
    # drafting this one: with `predraft_hit` of fully accepted pre-drafted blocks, what the
    # controller's guess-match rate learns from. None: not checked.
    bonus_guess_hit: bool | None = None
    # Send-ahead (`--pipeline send-ahead`): this block was sent before the previous verdict; blocks
    # sent ahead after this one that its verdict made stale, and the drafted tokens and estimated
    # drafting energy thrown away with them (the misses' cost; also counts a pre-draft miss).
    # Drafting seconds anywhere in this round's interval: the block's own (`t_draft_s`) plus, when
    # pipelining, pre-drafts and blocks drafted ahead meanwhile; NaN: the same as `t_draft_s`.
    # Power is split with this one, the per-token drafting time with `t_draft_s`.
    t_drafting_s: float = float("nan")
    # Sent before the previous block's verdict arrived (its transport time then includes a wait
    # behind that block at the edge); a block drafted ahead and sent once that verdict (a hit)
    # was in is not, though it carries a guess.
    sent_ahead: bool = False
    guessed: bool = False  # the block carries a guess (`DraftBlock.guess`): one drafter forward more
    follow: bool = False  # sent ahead empty (`DraftBlock.follow`, K = 0): nothing drafted
    # Blocks in flight that this round's miss cut (their verdicts come back stale): those with
    # drafts or a guess, and the empty (`follow`) ones apart.
    stale_blocks: int = 0
    stale_empty: int = 0
    # Bytes of stale verdicts (the answers to blocks an earlier miss cut) that arrived since the
    # last round: in this round's `bytes_down` and radio energy, though its own block did not cause them.
    stale_bytes_down: int = 0
    wasted_tokens: int = 0
    wasted_j: float = 0.0


@dataclass
class GenerationStats:
    """Per-generation counters reported by the device (and the benchmark)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    edge_compute_ms: float = 0.0  # the verdicts' compute_ms: each its whole batched forward's time
    # Each verdict's compute_ms over its batch's rows: this generation's share of the edge's
    # forwards (with N devices batched, the sum above counts a forward once per row).
    edge_share_ms: float = 0.0
    edge_queue_ms: float = 0.0
    block_sizes: list[int] = field(default_factory=list)
    energy_j: float = 0.0  # meter delta over the whole generation + radio energy of every message
    radio_j: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    energy_source: str = "none"
    energy_kind: str = "unavailable"  # the meter's part; radio_j is always modelled (estimated)
    radio_model: str = ""  # the radio profile radio_j comes from ("": none, no radio energy)
    rounds_log: list[Telemetry] = field(default_factory=list)
    stop_reason: str = ""  # eos, max_new_tokens, context_limit or error
