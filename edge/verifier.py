"""Verification of many sessions' draft blocks in one target forward.

Contract: `verify_batch(pairs)` takes plain `(TargetSession, DraftBlock)` pairs and returns, per
pair and in order, its `Accepted` (a, next token, rows in the forward that verified it) or the
exception that pair failed with: `StatusError` with its precise status, or (a genuine server fault)
any other exception, which the server answers INTERNAL for that session alone. It runs on the
model thread only. Each session keeps its own RNG (`TargetSession.accept`): its verdicts do not
depend on who it was batched with, and equal those it gets alone.

Checks: a pair flagged `validated` had its data checked once on the event loop (the server's
`decode_block`, the sampling parameters at open): only what can change while it waited is checked
again (`TargetSession.check_state`: closed, round, length). Any other pair gets the full
`TargetSession.check`. A session's second block in one batch fails FAILED_PRECONDITION.

Isolation (one session can never hurt another): every pair is checked before the forward and a
failing pair is left out of it; acceptance runs per row, so one row's exception fails only that
row, and that row's tokens and KV are put back as they were before the forward; and if the
batched forward itself raises, every row's tokens are as before it (`pooled_forward` restores
them) and each row is re-run alone, so the rows that can be verified still are, with the verdicts
they would have had alone.

`TargetSession` and `StatusError` live with the registry in `gelato.edge.sessions`; they are re-exported
here for the callers that import them from the verifier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

import grpc
import torch

from gelato.edge.kv_pool import pooled_forward
from gelato.edge.sessions import StatusError, TargetSession
from gelato.types import DraftBlock

__all__ = ["Accepted", "Outcome", "StatusError", "TargetSession", "verify_batch"]

log = logging.getLogger("gelato.edge")


class Accepted(NamedTuple):
    """A verified row: `n_accepted` drafts accepted, then `next_token`; `batch_rows` rows shared
    the forward. `alone`: (start, end) perf_counter of the row's own forward when it was re-run
    alone after the batched one failed (None: the batch's time is its time)."""

    n_accepted: int
    next_token: int
    batch_rows: int
    alone: tuple[float, float] | None = None


Outcome = Accepted | BaseException


def verify_batch(
    pairs: Sequence[tuple[TargetSession, DraftBlock]], validated: Sequence[bool] | None = None
) -> list[Outcome]:
    """Check every pair, one forward over the pairs that passed, then each row's acceptance; each
    pair's outcome is its own (see the module's isolation contract). `validated[i]`: pair i's data
    was already checked (default: none was). Model thread."""
    outcomes: list[Outcome | None] = [None] * len(pairs)
    live: list[int] = []
    seen: set[int] = set()
    for i, (session, block) in enumerate(pairs):
        try:
            if id(session) in seen:
                raise StatusError(
                    grpc.StatusCode.FAILED_PRECONDITION, "a block of this session is already being verified"
                )
            if validated is not None and validated[i]:
                session.check_state(block)
            else:
                session.check(block)
            seen.add(id(session))
            live.append(i)
        except Exception as exc:
            outcomes[i] = exc
    if live:
        try:
            _verify_rows(pairs, live, outcomes)
        except Exception:
            # The forward itself failed (a row no check foresaw): nothing was accepted and every
            # row's tokens are as before, so each row runs alone and only the row that really
            # breaks the forward fails.
            log.exception("batched forward of %d rows failed; verifying each row alone", len(live))
            for i in live:
                if outcomes[i] is not None:  # verified (or failed on its own) before the failure
                    continue
                try:
                    # Its state again: a session released while the forward ran (its device gone)
                    # is refused, not verified for nobody, its KV regrown past the planned shape.
                    pairs[i][0].check_state(pairs[i][1])
                    start = time.perf_counter()
                    _verify_rows(pairs, [i], outcomes)
                    if isinstance(done := outcomes[i], Accepted):  # its compute time is its own forward's
                        outcomes[i] = done._replace(alone=(start, time.perf_counter()))
                except Exception as exc:
                    outcomes[i] = exc
    return outcomes  # type: ignore[return-value]  # every pair has its outcome now


def greedy_argmaxes(logits: Sequence[torch.Tensor], ks: Sequence[int | None]) -> dict[int, list[int]]:
    """The target's argmaxes over the last k+1 logits of each row whose `ks` entry is its block's k
    (None: not a greedy row), by row index, fetched in one transfer: on a GPU one device sync for
    the batch instead of one per row (measured by `gelato.benchmarks.accept_overhead`; figures in
    benchmarks/results/gpu_h200/). Never raises: on any
    error it returns {} and each row takes its own argmax, as before (an exception here would
    leave the rows' drafts appended, which the caller's fallback does not expect)."""
    try:
        tails = [(j, lg[-(k + 1) :]) for j, (lg, k) in enumerate(zip(logits, ks, strict=True)) if k is not None]
        if not tails:
            return {}
        flat = torch.cat([t.argmax(dim=-1) for _, t in tails]).tolist()
        out, at = {}, 0
        for j, t in tails:
            out[j] = flat[at : at + t.shape[0]]
            at += t.shape[0]
        return out
    except Exception:
        log.exception("batched greedy argmax failed; rows take their own")
        return {}


def _verify_rows(
    pairs: Sequence[tuple[TargetSession, DraftBlock]], rows: list[int], outcomes: list[Outcome | None]
) -> None:
    """One forward over the pairs at `rows`, then acceptance row by row, into `outcomes`. Raises
    only if the forward or the step between rows does; then every row without an outcome is as
    before the forward (the rows with one keep it: the caller re-runs only the others). An
    acceptance failure is that row's outcome, and that row is put back as it was before the forward."""
    seqs = [pairs[i][0].seq for i in rows]
    marks = [(len(seq.tokens), seq.cached) for seq in seqs]
    logits = pooled_forward([(seq, pairs[i][1].ids) for seq, i in zip(seqs, rows, strict=True)])
    n = len(rows)
    try:
        greedy = [pairs[i][1].k if pairs[i][0].params.greedy else None for i in rows]
        best = greedy_argmaxes(logits, greedy)
        for j, (i, seq, (base, cached), lg) in enumerate(zip(rows, seqs, marks, logits, strict=True)):
            session, block = pairs[i]
            try:
                a, nxt = session.accept(block, base, lg, best.get(j))
                outcomes[i] = Accepted(a, nxt, n)
            except Exception as exc:
                seq.rewind(base, cached)  # drop the drafts, their KV and anything acceptance set
                outcomes[i] = exc
    except Exception:
        for i, seq, (base, cached) in zip(rows, seqs, marks, strict=True):
            if outcomes[i] is None:
                try:
                    seq.rewind(base, cached)
                except Exception as exc:  # not put back: never re-run (its drafts fed twice); it fails alone
                    outcomes[i] = exc
        raise
