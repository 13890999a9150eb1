"""Per-session target state and verification of one draft block (SPEC §2, §2.1).

Contract: a `TargetSession` owns the target KV for its accepted prefix, minus the last token
(which the next verify forward feeds together with the drafts: `[last, x1..xk]`). `verify(block)`
runs one target forward, applies greedy or lossless speculative-sampling acceptance with the
session's own seeded RNG, keeps target KV only for the accepted prefix, and returns (a, next).
The KV lives in a slot of the edge's shared `KVPool` (a private one when none is given), so many
sessions verify in one forward (`edge.kv_pool.pooled_forward`). Called on the model thread only,
`close` included (the server submits it there), so a freed slot is never still in a pending forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from edge.kv_pool import KVPool, PooledSequence
from gelato.models import LoadedModel
from gelato.sampling import process_logits, verify_greedy, verify_sampling
from gelato.types import DraftBlock, SamplingParams
from gelato.wire import derive_seed


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
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.pool is None:
            limit = self.loaded.context_limit
            self.pool = KVPool(self.loaded.model, self.loaded.vocab_size, slots=1, max_context=limit)
        self.seq = PooledSequence(self.pool, self.prefix_ids)
        self.generator = torch.Generator().manual_seed(derive_seed(self.params.seed, "target"))

    def prefill(self) -> None:
        """Cache the prefix except its last token, which the first verify forward feeds."""
        self.seq.prefill(len(self.seq.tokens) - 1)

    @property
    def length(self) -> int:
        return len(self.seq.tokens)

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
            a, nxt = verify_sampling(process_logits(rows, self.params), block.ids, block.q, self.generator)
        self.seq.set_tail(base, [*block.ids[:a], nxt])
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
