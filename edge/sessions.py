"""The edge's session registry with admission control and idle expiry (SPEC §3, §8).

Contract: `SessionRegistry.admit(...)` creates a `TargetSession` or raises `AdmissionError`
(the server answers RESOURCE_EXHAUSTED) when `max_sessions` are open or the session's KV
reservation would pass `kv_budget_bytes`. A session reserves KV for its whole possible length
(prefix + max_new_tokens + one draft block, capped at the context limit), so admitted sessions
never run out mid-generation. The budget counts reservations; the shared `KVPool` behind them grows
by doubling and may hold up to ≈2× more per dimension (slots, context) than is reserved.
`release(id)` frees a session (its slot in the pool) and is idempotent, so every way a stream can
end (close, cancel, error, idle timeout of a vanished device) may call it. Event-loop only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from edge.kv_pool import KVPool
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


@dataclass
class _Entry:
    session: TargetSession
    reserved_bytes: int


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
        self.entries: dict[str, _Entry] = {}
        self.pool: KVPool | None = None  # one per target model, created with the first session

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def reserved_bytes(self) -> int:
        return sum(e.reserved_bytes for e in self.entries.values())

    def kv_bytes(self) -> int:
        """KV actually held by open sessions (walks their caches: not for the hot path)."""
        return sum(e.session.kv_bytes() for e in self.entries.values())

    def admit(
        self, loaded: LoadedModel, params: SamplingParams, prefix_ids: list[int], max_new_tokens: int
    ) -> TargetSession:
        if len(self.entries) >= self.max_sessions:
            raise AdmissionError(f"edge is at its session limit ({self.max_sessions}); try again later")
        wanted = len(prefix_ids) + (max_new_tokens or loaded.context_limit) + self.max_draft_tokens + 1
        reserve = min(loaded.context_limit, wanted) * kv_bytes_per_token(loaded)
        if self.kv_budget_bytes and self.reserved_bytes + reserve > self.kv_budget_bytes:
            raise AdmissionError(
                f"edge KV budget exhausted: this session needs {reserve / 2**20:.1f} MiB, "
                f"{(self.kv_budget_bytes - self.reserved_bytes) / 2**20:.1f} MiB of "
                f"{self.kv_budget_bytes / 2**20:.1f} MiB free; try again later or ask for fewer tokens"
            )
        sid = uuid.uuid4().hex[:16]
        if self.pool is None:
            self.pool = KVPool(loaded.model, loaded.vocab_size, max_context=loaded.context_limit)
        session = TargetSession(sid, loaded, params, list(prefix_ids), max_new_tokens, pool=self.pool)
        self.entries[sid] = _Entry(session, reserve)
        return session

    def release(self, session_id: str) -> None:
        entry = self.entries.pop(session_id, None)
        if entry is not None:
            self.closer(entry.session)
