"""An in-process edge for send-ahead, for tests and benchmarks: `local_link(session)`.

Contract: `local_link(session, max_ahead, delay_s, empty_ahead)` is a `gelato.device.pipeline.Link`
whose edge is a `gelato.edge.sessions.TargetSession`-like object the caller passes in
(`resolve_ahead`, `verify`; `device` never imports `edge`), answering blocks in order as the edge's
stream does: each verdict `delay_s` after its block was sent, a stale block's without a verify.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gelato.device.energy import wire_bytes
from gelato.device.pipeline import Link
from gelato.types import DraftBlock, Verdict
from gelato.wire import encode_block, encode_verdict


def local_link(session: Any, max_ahead: int = 4, delay_s: float = 0.0, empty_ahead: bool = True) -> Link:
    """An in-process edge for send-ahead, for benchmarks and tests: an `gelato.edge.verifier.TargetSession`-
    like object (`resolve_ahead`, `verify`) answers the blocks in order, as the edge's stream does,
    each verdict `delay_s` after its block was sent (a stand-in for the round trip), a stale
    block's without a verify (answered on arrival, as the edge does). `device` never imports
    `edge`: the caller passes the session in. A verify that raises is raised by the next
    `receive` (as a failed read is), never a receive left waiting."""
    blocks: asyncio.Queue[tuple[DraftBlock, float]] = asyncio.Queue()
    verdicts: asyncio.Queue[tuple[Verdict, int] | Exception] = asyncio.Queue()

    async def serve() -> None:
        while True:
            block, sent_at = await blocks.get()
            await asyncio.sleep(max(0.0, sent_at + delay_s - time.perf_counter()))
            try:
                verdict = _answer(session, block, max_ahead)
            except Exception as exc:  # the stream ends with it, as the edge's would
                verdicts.put_nowait(exc)
                return
            verdicts.put_nowait((verdict, wire_bytes(encode_verdict(verdict).ByteSize())))

    task: asyncio.Task[None] | None = None

    async def send(block: DraftBlock) -> int:
        nonlocal task
        if task is None:
            task = asyncio.get_running_loop().create_task(serve())
        blocks.put_nowait((block, time.perf_counter()))
        return wire_bytes(encode_block(block).ByteSize())

    async def receive() -> tuple[Verdict, int]:
        item = await verdicts.get()
        if isinstance(item, Exception):
            raise item
        return item

    return Link(send, receive, max_ahead, empty_ahead)


def _answer(session: Any, block: DraftBlock, max_ahead: int) -> Verdict:
    if block.guess is not None or block.follow:
        resolved = session.resolve_ahead(block, max_ahead)
        if resolved is None:
            return Verdict(round=block.round, n_accepted=0, next_token=0, stale=True, batch_rows=0)
        block = resolved
    t0 = time.perf_counter()
    a, nxt = session.verify(block)
    return Verdict(round=block.round, n_accepted=a, next_token=nxt, compute_ms=(time.perf_counter() - t0) * 1e3)
