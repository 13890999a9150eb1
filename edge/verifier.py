"""Per-session target state and verification of one draft block (SPEC §2, §2.1).

Contract: a `TargetSession` owns the target KV for its accepted prefix, minus the last token
(which the next verify forward feeds together with the drafts: `[last, x1..xk]`). `verify(block)`
runs one target forward, applies greedy or lossless speculative-sampling acceptance with the
session's own seeded RNG, keeps target KV only for the accepted prefix, and returns (a, next).
The KV lives in a slot of the edge's shared `KVPool` (a private one when none is given), so many
sessions verify in one forward (`edge.kv_pool.pooled_forward`). Called on the model thread only,
`close` included (the server submits it there), so a freed slot is never still in a pending forward.

Failures carry their gRPC status: `check(block)` raises `StatusError` (INVALID_ARGUMENT for bad
parameters or data, FAILED_PRECONDITION for a wrong round or a closed session, OUT_OF_RANGE for a
block past the context limit or the session's reservation) BEFORE anything is run, so a row that
would fail never enters a batched forward; the batcher and the server map any other exception to
INTERNAL for that row alone.

Send-ahead (pipelined speculation): `resolve_ahead(block)` takes a block sent before its parent
round's verdict (`block.guess` set) and returns the ordinary block to verify when the parent
accepted every draft and its target token was the guess (a hit), or None (stale: answered at once,
nothing run, nothing changed). Duplicate, out-of-order and too-deep blocks raise `StatusError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import grpc
import torch

from edge.kv_pool import KVPool, PooledSequence
from gelato.models import LoadedModel
from gelato.sampling import KeyedRng, process_logits, verify_greedy, verify_sampling
from gelato.types import DraftBlock, SamplingParams
from gelato.wire import WireError, check_block


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
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.pool is None:
            limit = self.loaded.context_limit
            self.pool = KVPool(self.loaded.model, self.loaded.vocab_size, slots=1, max_context=limit)
        self.seq = PooledSequence(self.pool, self.prefix_ids)
        # Draws keyed by token position (not a stream): a session re-opened after a failover with
        # the accepted prefix draws what this one would have.
        self.rng = KeyedRng(self.params.seed, "target")

    def prefill(self) -> None:
        """Cache the prefix except its last token, which the first verify forward feeds."""
        self.seq.prefill(len(self.seq.tokens) - 1)

    @property
    def length(self) -> int:
        return len(self.seq.tokens)

    def check(self, block: DraftBlock) -> None:
        """Everything that can make this block fail, checked before it runs: raises
        `StatusError`. Pure (reads state only), so the event loop and the model thread may both
        call it; the batcher does, on rows that may have bypassed the server's checks."""
        if self.seq.closed:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "the session was closed")
        try:
            self.params.validate()
            check_block(block, self.loaded.vocab_size, self.params.greedy)
        except ValueError as exc:  # WireError included
            where = "sampling: " if not isinstance(exc, WireError) else ""
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}{exc}") from exc
        if block.round != self.rounds:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"draft block for round {block.round}, but the session is at round {self.rounds}",
            )
        limit = self.loaded.context_limit
        if self.length + block.k >= limit:
            # The forward ends at length + k; the verdict's extra token must fit too.
            raise StatusError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{self.length} tokens + {block.k} drafts reach the context limit of {limit}",
            )
        if self.reserved_tokens and self.length + block.k >= self.reserved_tokens:
            # Admission reserved KV for prefix + max_new_tokens + one block; going past it would
            # grow the shared pool beyond what the budget was charged.
            raise StatusError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{self.length} tokens + {block.k} drafts pass the {self.reserved_tokens} tokens reserved "
                f"at open (prefix + max_new_tokens {self.max_new_tokens} + one block); open a new session",
            )

    def resolve_ahead(self, block: DraftBlock, max_ahead_rounds: int) -> DraftBlock | None:
        """A send-ahead block (`block.guess` set) as the ordinary block to verify, or None when it
        is stale: its parent round (round - 1) was not verified as a full accept whose target token
        is the guess. Blocks for a round already verified, or further than `max_ahead_rounds` past
        the session's round, raise `StatusError`. Reads state only."""
        if block.round < self.rounds:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"send-ahead block for round {block.round}, which was already verified (the session is at "
                f"round {self.rounds}): duplicate or out of order",
            )
        if block.round - self.rounds >= max_ahead_rounds:
            raise StatusError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"send-ahead block for round {block.round} is {block.round - self.rounds + 1} rounds past the "
                f"session's round {self.rounds}; this edge allows {max_ahead_rounds}",
            )
        if block.round == self.rounds and self.rounds > 0 and self.last_bonus == block.guess:
            return replace(block, guess=None)
        return None

    def verify(self, block: DraftBlock) -> tuple[int, int]:
        """One round alone: target forward over [last, x1..xk], acceptance, rollback."""
        base = len(self.seq.tokens)
        logits = self.seq.forward(block.ids)
        return self.accept(block, base, logits)

    def accept(self, block: DraftBlock, base: int, logits: torch.Tensor) -> tuple[int, int]:
        """Acceptance on this round's logits (the last k+1 rows predict x1..xk and the bonus),
        then keep tokens and KV only for the accepted prefix. Returns (a, next)."""
        rows = logits[-(block.k + 1) :]
        if self.params.greedy:
            a, nxt = verify_greedy(rows, block.ids)
        else:
            a, nxt = verify_sampling(process_logits(rows, self.params), block.ids, block.q, self.rng, base)
        self.seq.set_tail(base, [*block.ids[:a], nxt])
        self.last_bonus = nxt if a == block.k else None
        self.rounds += 1
        self.last_active = time.monotonic()
        return a, nxt

    def kv_bytes(self) -> int:
        return self.seq.kv_bytes()

    def close(self) -> None:
        """Give the KV slot back to the pool (idempotent) and let the pool take the shape the
        registry planned without it (model thread)."""
        self.seq.release()
        self.seq.pool.apply_target()
