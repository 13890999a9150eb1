"""The edge's session registry with admission control and idle expiry (SPEC §3, §8).

Contract: `SessionRegistry.admit(...)` creates a `TargetSession` or raises `AdmissionError`
(the server answers RESOURCE_EXHAUSTED) when `max_sessions` are open or the KV pool would pass
`kv_budget_bytes`. A session reserves KV for its whole possible length (prefix + max_new_tokens +
one draft block, capped at the context limit), so admitted sessions never run out mid-generation.
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

from edge.kv_pool import KVPool, plan_pool
from edge.verifier import TargetSession
from gelato.models import LoadedModel
from gelato.types import SamplingParams


class AdmissionError(RuntimeError):
    """Opening one more session would exceed a limit; existing sessions are unaffected."""


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    cfg = loaded.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(loaded.model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


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
        self.pool: KVPool | None = None  # one per target model, created with the first session
        self.shape = (0, 0)  # (slots, context) last planned for the pool

    def __len__(self) -> int:
        return len(self.entries)

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
        return sum(s.kv_bytes() for s in self.entries.values())

    def pool_bytes(self) -> int:
        return self.pool.nbytes() if self.pool is not None else 0

    def _plan(self, sessions: int, tokens: int) -> tuple[int, int] | None:
        assert self.pool is not None
        budget = self.kv_budget_bytes and max(1, self.kv_budget_bytes // self.pool.bytes_per_token())
        return plan_pool(self.shape, sessions, tokens, budget)

    def admit(
        self, loaded: LoadedModel, params: SamplingParams, prefix_ids: list[int], max_new_tokens: int
    ) -> TargetSession:
        if len(self.entries) >= self.max_sessions:
            raise AdmissionError(f"edge is at its session limit ({self.max_sessions}); try again later")
        wanted = len(prefix_ids) + (max_new_tokens or loaded.context_limit) + self.max_draft_tokens + 1
        tokens = min(loaded.context_limit, wanted)
        if self.pool is None:
            self.pool = KVPool(loaded.model, loaded.vocab_size, slots=0, context=0, max_context=loaded.context_limit)
        sessions, longest = len(self.entries) + 1, self._longest(tokens)
        shape = self._plan(sessions, longest)
        if shape is None:
            mib = 2**20 / self.pool.bytes_per_token()
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
        if session is None:
            return
        shape = self._plan(len(self.entries), self._longest())
        if shape is not None:  # fewer sessions always fit; the check is for the type checker
            self._reshape(shape)
        # Set the shape first: closing (on the model thread) applies it, so an idle edge frees its KV.
        self.closer(session)
