"""What the edge logs about each session (logger `gelato.edge`), apart from its errors.

Contract: `log_open(session, peer)` and `log_end(session, outcome)` at INFO, once per session
(`--log-level INFO`; with `--log-format json` their numbers are fields of the JSON line: `event`
session_open / session_end, `session`, `peer`, `prompt_tokens`, `max_new_tokens`, `sampling`,
`outcome` (the stream's status: OK, CANCELLED, a gRPC code's name), `rounds`, `tokens`);
`log_close_failure(session, future)` is the done-callback of a close run on the model thread.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from gelato.edge.sessions import TargetSession

log = logging.getLogger("gelato.edge")


def log_close_failure(session: TargetSession, done: Future[None]) -> None:
    """A session's close runs on the model thread and nobody awaits it: its failure (e.g. the pool
    could not take the shape the release asked for) is logged here, not lost. Its slot was freed
    before anything could fail, and the shape is tried again at the next forward."""
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.error("session %s: closing it on the model thread failed", session.session_id, exc_info=exc)


def log_open(session: TargetSession, peer: str) -> None:
    """A session's start at INFO (with `--log-format json`, its numbers as fields)."""
    fields = {
        "event": "session_open",
        "session": session.session_id,
        "peer": peer,
        "prompt_tokens": len(session.prefix_ids),
        "max_new_tokens": session.max_new_tokens,
        "sampling": "greedy" if session.params.greedy else "sampling",
    }
    log.info(
        "session %s opened from %s: %d prompt tokens, up to %d new, %s",
        session.session_id,
        peer,
        fields["prompt_tokens"],
        session.max_new_tokens,
        fields["sampling"],
        extra={"fields": fields},
    )


def log_end(session: TargetSession, outcome: str) -> None:
    """A session's end at INFO: how (the stream's status) and what it did."""
    tokens = max(0, len(session.seq.tokens) - len(session.prefix_ids))
    fields = {"event": "session_end", "session": session.session_id, "outcome": outcome, "rounds": session.rounds}
    fields["tokens"] = tokens
    log.info(
        "session %s ended %s: %d rounds, %d tokens",
        session.session_id,
        outcome,
        session.rounds,
        tokens,
        extra={"fields": fields},
    )
