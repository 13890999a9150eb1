"""The edge's session registry with admission control.

Contract: `SessionRegistry.admit(...)` creates a `TargetSession` or raises `AdmissionError`
(the server answers RESOURCE_EXHAUSTED) when `max_sessions` are open; `release(id)` frees a
session and is idempotent, so every way a stream can end (close, cancel, error, vanished device)
may call it. Event-loop only; sessions themselves are used on the model thread.
"""

from __future__ import annotations

import uuid

from edge.verifier import TargetSession
from gelato.models import LoadedModel
from gelato.types import SamplingParams


class AdmissionError(RuntimeError):
    """Opening one more session would exceed a limit; existing sessions are unaffected."""


class SessionRegistry:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.sessions: dict[str, TargetSession] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def admit(
        self, loaded: LoadedModel, params: SamplingParams, prefix_ids: list[int], max_new_tokens: int
    ) -> TargetSession:
        if len(self.sessions) >= self.max_sessions:
            raise AdmissionError(f"edge is at its session limit ({self.max_sessions}); try again later")
        sid = uuid.uuid4().hex[:16]
        session = TargetSession(sid, loaded, params, list(prefix_ids), max_new_tokens)
        self.sessions[sid] = session
        return session

    def release(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
