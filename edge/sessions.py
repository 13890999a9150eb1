"""The edge's sessions: the per-session target state (`TargetSession`) and the registry that
admits, shapes and frees them (`SessionRegistry`).

`TargetSession` contract: it owns the target KV for its accepted prefix, minus the last token
(which the next verify forward feeds together with the drafts: `[last, x1..xk]`), in a slot of the
edge's shared `KVPool` (a private one when none is given). `accept(block, base, logits)` applies
greedy or lossless speculative-sampling acceptance to a forward's logits with the session's own
seeded RNG (draws keyed by token position) and keeps tokens and KV only for the accepted prefix;
`verify(block)` is one round for this session alone (forward + `accept`, in process: tests,
benchmarks, local verifiers). The edge verifies through `gelato.edge.verifier.verify_batch`, which batches
many sessions' blocks into one forward and owns the checks, rollback and isolation. Everything that
touches KV runs on the model thread, `close` included (the server submits it there), so a freed
slot is never still in a pending forward.

Failures carry their gRPC status (`StatusError`): `check(block)` raises INVALID_ARGUMENT for bad
parameters or data, FAILED_PRECONDITION for a wrong round or a closed session, OUT_OF_RANGE for a
block past the context limit or the session's reservation, BEFORE anything is run. It is
`check_data` (what a block can never pass later: parameters, ids, q; `gelato.wire.decode_block`
and `decode_sampling` at open guarantee it for blocks from the wire) plus `check_state` (what can
change while a block waits: closed, round, length against the context limit and the reservation).

Send-ahead (pipelined speculation): `resolve_ahead(block)` takes a block sent before its parent
round's verdict (`block.guess` set) and returns the ordinary block to verify when the parent
accepted every draft and its target token was the guess (a hit), or None (stale: answered at once,
nothing run, nothing changed). An empty send-ahead block (`block.follow`: no guess, no drafts)
asks for the next target token whatever the parent gave: verified whenever the parent round was.
Duplicate, out-of-order and too-deep blocks raise `StatusError`.

`SessionRegistry` contract: `admit(...)` creates a `TargetSession` or raises `AdmissionError`
(the server answers RESOURCE_EXHAUSTED) when `max_sessions` are open or the KV pool would pass
`kv_budget_bytes`. A session reserves KV for its whole possible length (prefix + max_new_tokens +
one draft block, capped at the context limit), so admitted sessions never run out mid-generation:
the budget is charged for it at admission, and the first prefill takes its slot and context (a
device with no memory for them fails that open, not a later round).
All sessions share one slot-based `KVPool` whose slots are as long as its context, so what the
budget is charged is the pool the open sessions need — sessions × their longest reservation — and
the registry shapes the pool (`plan_pool`, `KVPool.set_target`) to stay within the budget: the
budget bounds real memory, and one long session makes every slot long. `release(id)` frees a
session (its slot; the pool shrinks when it can) and is idempotent, so every way a stream can end
(close, cancel, error, idle timeout of a vanished device) may call it. Event-loop only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
import torch

from gelato.edge.kv_pool import KVPool, PooledSequence
from gelato.edge.pool_cache import pool_model
from gelato.models import LoadedModel
from gelato.sampling import KeyedRng, accept_greedy, process_logits, verify_greedy, verify_sampling
from gelato.types import DraftBlock, SamplingParams
from gelato.wire import WireError, check_block


def plan_pool(
    current: tuple[int, int],
    sessions: int,
    tokens: int,
    budget_tokens: int = 0,
    align: int = 64,
    max_slots: int = 0,
) -> tuple[int, int] | None:
    """The `(slots, context)` a pool should have for `sessions` open sessions whose longest
    reservation is `tokens`; None when no shape within `budget_tokens` (slots × context, 0: no
    limit) can hold them. Pure. Slots double when short and halve when four times too many, never
    past `max_slots` (the session limit; 0: none); context is kept while it lies within [tokens,
    2 × aligned tokens]; both only as the budget allows."""
    if sessions <= 0:
        return (0, 0)  # an idle edge holds no KV
    if budget_tokens and sessions * tokens > budget_tokens:
        return None
    slots, context = current
    if not tokens <= context <= 2 * -(-tokens // align) * align:
        context = -(-tokens // align) * align
    if sessions > slots:
        slots = max(sessions, 2 * slots)
    elif slots > 4 * sessions:
        slots = 2 * sessions
    if max_slots:
        slots = max(sessions, min(slots, max_slots))  # more sessions are never admitted
    if budget_tokens and slots * context > budget_tokens:
        if sessions * context > budget_tokens:
            context = tokens  # alignment does not fit: exactly what is needed
        slots = max(sessions, min(slots, budget_tokens // context))
    return (slots, context)


class StatusError(Exception):
    """A failure with the precise gRPC status it is answered with (one session's, never the
    server's). Typed so no caller has to guess a status from a message's text."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class TargetSession:
    session_id: str
    loaded: LoadedModel
    params: SamplingParams
    prefix_ids: list[int]
    max_new_tokens: int = 0
    pool: KVPool | None = None
    reserved_tokens: int = 0  # the length admission control reserved KV for (0: the context limit)
    rounds: int = 0
    # The last round's target token when that round accepted every draft, else None: what a
    # send-ahead block for the next round must have guessed.
    last_bonus: int | None = None
    # Set on the event loop when the registry lets the session go (its stream ended), before its
    # slot is given back on the model thread: a block of it still queued there is refused, not
    # verified for nobody (and not grown past the shape the registry planned without it).
    released: bool = False

    def __post_init__(self) -> None:
        # Within a sliding window only (a target the server loaded is cut already: a no-op then).
        self.loaded = pool_model(self.loaded, quiet=True)
        if self.pool is None:
            limit = self.loaded.context_limit
            self.pool = KVPool(self.loaded.model, self.loaded.vocab_size, slots=1, max_context=limit)
        self.seq = PooledSequence(self.pool, self.prefix_ids)
        # Draws keyed by token position (not a stream): a session re-opened after a failover with
        # the accepted prefix draws what this one would have.
        self.rng = KeyedRng(self.params.seed, "target")

    def prefill(self, max_tokens: int = 0) -> bool:
        """Cache the prefix except its last token, which the first verify forward feeds; at most
        `max_tokens` more of it per call (0: all). Returns whether the prefix is cached now. In
        pieces, a long prompt's forward never needs its whole [prompt x prompt] mask at once, and
        other sessions' verification can run on the model thread in between (the server submits
        each piece as its own job). A piece still queued when the session was released does
        nothing."""
        if self.released:
            return True
        if self.seq.slot is None and self.reserved_tokens:
            # First the room admission reserved (a one-token prompt caches nothing here): a pool
            # with no memory for it fails this open RESOURCE_EXHAUSTED, not a later verify.
            self.seq.reserve(self.reserved_tokens)
        upto = len(self.seq.tokens) - 1
        if max_tokens > 0:
            upto = min(upto, self.seq.cached + max_tokens)
        self.seq.prefill(upto)
        return self.seq.cached >= len(self.seq.tokens) - 1

    @property
    def length(self) -> int:
        return len(self.seq.tokens)

    def check(self, block: DraftBlock) -> None:
        """Everything that can make this block fail, checked before it runs: raises
        `StatusError`. Pure (reads state only), so the event loop and the model thread may both
        call it; for blocks that did not come through the server's decoding."""
        if self.seq.closed or self.released:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "the session was closed")
        self.check_data(block)
        self.check_state(block)

    def check_data(self, block: DraftBlock) -> None:
        """The session's sampling parameters and the block's data (ids, q) against this session:
        INVALID_ARGUMENT. What `decode_block` (and `decode_sampling` at open) already guarantee,
        and nothing a block can pass later: validated once. Pure."""
        try:
            self.params.validate()
            check_block(block, self.loaded.vocab_size, self.params.greedy)
        except ValueError as exc:  # WireError included
            where = "sampling: " if not isinstance(exc, WireError) else ""
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}{exc}") from exc

    def check_state(self, block: DraftBlock) -> None:
        """What can change while a block waits: the session closed (FAILED_PRECONDITION), its round
        (FAILED_PRECONDITION), its length against the context limit and the reservation
        (OUT_OF_RANGE). Pure and cheap: checked on the event loop and again on the model thread."""
        if self.seq.closed or self.released:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "the session was closed")
        if block.guess is not None or block.follow:
            # Verified as is, its guess would be ignored (a wrong verdict): `resolve_ahead` first.
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION, "a send-ahead block must be resolved against its parent first"
            )
        if block.round != self.rounds:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"draft block for round {block.round}, but the session is at round {self.rounds}",
            )
        length, k = len(self.seq.tokens), len(block.ids)
        limit = self.loaded.context_limit
        if length + k >= limit:
            # The forward ends at length + k; the verdict's extra token must fit too.
            raise StatusError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{length} tokens + {k} drafts reach the context limit of {limit}",
            )
        if self.reserved_tokens and length + k >= self.reserved_tokens:
            # Admission reserved KV for prefix + max_new_tokens + one block; going past it would
            # grow the shared pool beyond what the budget was charged.
            raise StatusError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{length} tokens + {k} drafts pass the {self.reserved_tokens} tokens reserved "
                f"at open (prefix + max_new_tokens {self.max_new_tokens} + one block); open a new session",
            )

    def resolve_ahead(self, block: DraftBlock, max_ahead_rounds: int) -> DraftBlock | None:
        """A send-ahead block (`block.guess` or `block.follow` set) as the ordinary block to verify,
        or None when it is stale: its parent round (round - 1) was not verified (for a guessed block:
        not verified as a full accept whose target token is the guess). Blocks for a round already
        verified, or further than `max_ahead_rounds` past the session's round, raise `StatusError`.
        Reads state only."""
        if block.round < self.rounds:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"send-ahead block for round {block.round}, which was already verified (the session is at "
                f"round {self.rounds}): duplicate or out of order",
            )
        if block.round - self.rounds >= max_ahead_rounds:
            raise StatusError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"send-ahead block for round {block.round} is block {block.round - self.rounds + 1} past the last "
                f"verdict (the session is at round {self.rounds}); this edge allows {max_ahead_rounds}",
            )
        if block.round != self.rounds or self.rounds == 0:
            return None
        if block.follow:  # nothing of the device's in it: the parent's outcome does not matter
            return replace(block, follow=False)
        return replace(block, guess=None) if self.last_bonus == block.guess else None

    def verify(self, block: DraftBlock) -> tuple[int, int]:
        """One round alone, in process: target forward over [last, x1..xk], acceptance, rollback.
        No checks and no batching (the edge uses `gelato.edge.verifier.verify_batch`)."""
        base = len(self.seq.tokens)
        logits = self.seq.forward(block.ids)
        return self.accept(block, base, logits)

    def accept(
        self, block: DraftBlock, base: int, logits: torch.Tensor, greedy_best: list[int] | None = None
    ) -> tuple[int, int]:
        """Acceptance on this round's logits (the last k+1 rows predict x1..xk and the bonus),
        then keep tokens and KV only for the accepted prefix. `base` is the length before the
        forward. `greedy_best`: those rows' argmaxes, when the caller fetched them already (a
        batch fetches every greedy row's in one transfer). Returns (a, next)."""
        rows = logits[-(block.k + 1) :]
        if self.params.greedy:
            if greedy_best is not None and len(greedy_best) == block.k + 1:
                a, nxt = accept_greedy(greedy_best, block.ids)
            else:
                a, nxt = verify_greedy(rows, block.ids)
        else:
            a, nxt = verify_sampling(process_logits(rows, self.params), block.ids, block.q, self.rng, base)
        self.seq.set_verdict(base, block.ids[:a], nxt)
        self.last_bonus = nxt if a == block.k else None
        self.rounds += 1
        return a, nxt

    def kv_bytes(self) -> int:
        return self.seq.kv_bytes()

    def close(self) -> None:
        """Give the KV slot back to the pool (idempotent) and let the pool take the shape the
        registry planned without it (model thread)."""
        self.seq.release()
        self.seq.pool.apply_target()


class AdmissionError(RuntimeError):
    """Opening one more session would exceed a limit; existing sessions are unaffected."""


class SessionRegistry:
    def __init__(
        self,
        max_sessions: int,
        kv_budget_bytes: int,
        max_draft_tokens: int,
        closer: Callable[[TargetSession], None] = TargetSession.close,
    ) -> None:
        # `closer` gives a session's KV slot back; the server runs it on the model thread so that
        # no forward still holding the slot can run after it.
        self.closer = closer
        self.max_sessions = max_sessions
        self.kv_budget_bytes = kv_budget_bytes  # 0: no KV limit
        self.max_draft_tokens = max_draft_tokens
        self.entries: dict[str, TargetSession] = {}
        # Sessions opened and prefilled: the ones that can send a block. The batcher closes its
        # window once each has a row in; one still prefilling would hold it for the whole window.
        self._ready: set[str] = set()
        self.pool: KVPool | None = None  # one per target model, created with the first session
        self.shape = (0, 0)  # (slots, context) last planned for the pool

    def __len__(self) -> int:
        return len(self.entries)

    def mark_ready(self, session_id: str) -> None:
        """The session's prompt is prefilled and it is answered opened (event loop)."""
        if session_id in self.entries:
            self._ready.add(session_id)

    def ready(self) -> int:
        """Sessions that can send a block now (opened, prefilled): what a batch may wait for."""
        return len(self._ready)

    def _longest(self, extra: int = 0) -> int:
        return max([extra] + [s.reserved_tokens for s in self.entries.values()])

    @property
    def reserved_bytes(self) -> int:
        """What the budget is charged: open sessions × their longest reservation."""
        if self.pool is None:
            return 0
        return len(self.entries) * self._longest() * self.pool.bytes_per_token()

    def kv_bytes(self) -> int:
        """KV actually held by open sessions' tokens (walks them: not for the hot path)."""
        return sum(s.kv_bytes() for s in list(self.entries.values()))  # a copy: metrics read it off the loop

    def pool_bytes(self) -> int:
        return self.pool.nbytes() if self.pool is not None else 0

    def _plan(self, sessions: int, tokens: int) -> tuple[int, int] | None:
        assert self.pool is not None
        budget = self.kv_budget_bytes and max(1, self.kv_budget_bytes // self.pool.bytes_per_token())
        return plan_pool(self.shape, sessions, tokens, budget, max_slots=self.max_sessions)

    def prepare(self, loaded: LoadedModel) -> None:
        """The KV pool for `loaded`, empty (its shape comes with the sessions). It reads the model's
        parameters and, for a model placed by accelerate, walks its modules: on the model thread,
        before the first open, not on the event loop in it."""
        if self.pool is None:
            self.pool = KVPool(loaded.model, loaded.vocab_size, slots=0, context=0, max_context=loaded.context_limit)

    def admit(
        self, loaded: LoadedModel, params: SamplingParams, prefix_ids: list[int], max_new_tokens: int
    ) -> TargetSession:
        if len(self.entries) >= self.max_sessions:
            raise AdmissionError(f"edge is at its session limit ({self.max_sessions}); try again later")
        wanted = len(prefix_ids) + (max_new_tokens or loaded.context_limit) + self.max_draft_tokens + 1
        tokens = min(loaded.context_limit, wanted)
        self.prepare(loaded)  # the server did it on the model thread already (`EdgeServer.serve_loaded`)
        assert self.pool is not None
        sessions, longest = len(self.entries) + 1, self._longest(tokens)
        shape = self._plan(sessions, longest)
        mib = 2**20 / self.pool.bytes_per_token()
        if shape is None and self._plan(1, tokens) is None:  # not even alone: waiting cannot help
            raise AdmissionError(
                f"edge KV budget too small for this session: it reserves {tokens} tokens (prompt "
                f"{len(prefix_ids)} + max_new_tokens {max_new_tokens or 'up to the context limit'} + "
                f"the edge's block limit {self.max_draft_tokens} + 1, at most the context limit "
                f"{loaded.context_limit}), {tokens / mib:.1f} MiB, more than the whole "
                f"{self.kv_budget_bytes / 2**20:.1f} MiB budget; ask for fewer tokens"
            )
        if shape is None:
            raise AdmissionError(
                f"edge KV budget exhausted: this session reserves {tokens} tokens; {sessions} sessions "
                f"with slots of {longest} tokens would need {sessions * longest / mib:.1f} MiB of the "
                f"{self.kv_budget_bytes / 2**20:.1f} MiB budget; try again later or ask for fewer tokens"
            )
        sid = uuid.uuid4().hex[:16]
        session = TargetSession(
            sid, loaded, params, list(prefix_ids), max_new_tokens, pool=self.pool, reserved_tokens=tokens
        )
        self.entries[sid] = session
        self._reshape(shape)
        return session

    def _reshape(self, shape: tuple[int, int]) -> None:
        assert self.pool is not None
        if shape != self.shape:
            self.shape = shape
            self.pool.set_target(*shape)  # applied on the model thread, before its next use

    def release(self, session_id: str) -> None:
        session = self.entries.pop(session_id, None)
        self._ready.discard(session_id)
        if session is None:
            return
        session.released = True
        shape = self._plan(len(self.entries), self._longest())
        if shape is not None:  # fewer sessions always fit; the check is for the type checker
            self._reshape(shape)
        # Set the shape first: closing (on the model thread) applies it, so an idle edge frees its KV.
        self.closer(session)
