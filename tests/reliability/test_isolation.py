"""One session can never hurt another: a poisoned row batched with good rows gets its
own precise error, and every good row's verdicts equal the verdicts it gets alone, exactly.

At the Batcher level, poisoned rows are handed to the batcher directly, bypassing the server's
validation: NaN-producing sampling parameters, blocks past the context limit, out-of-range ids,
NaN q, a wrong round, a row that breaks the batched forward itself (an id past the embedding
table) and a row whose acceptance raises. Over real gRPC, poisoned streams (tiny temperature, a
block past the context limit, a 64 KiB drafter name, corrupt bytes, NaN q) run concurrently with
good sessions, among them a long-block session next to one near the context limit (those two
used to fail each other with INTERNAL).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from gelato.benchmarks.load_streams import RawStream, Spec, make_block, open_message, run_session
from gelato.edge.batcher import Batcher
from gelato.edge.kv_pool import KVPool
from gelato.edge.metrics import EdgeMetrics
from gelato.edge.sessions import StatusError, TargetSession
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams, SparseDist, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import encode_block
from tests.conftest import EdgeProcess
from tests.reliability.drafts import TargetDrafts, assert_both_paths

ROUNDS = 5
GOOD = {  # name -> spec; the context limit of the test target is 512
    "greedy": Spec(tuple(range(5, 10)), k=4, rounds=ROUNDS),
    "long-blocks": Spec((3, 4, 5), k=32, rounds=ROUNDS),
    "near-limit": Spec(tuple(i % 300 + 1 for i in range(500)), k=1, rounds=ROUNDS),  # ends by 510 + 1 < 512
    "sampling": Spec(tuple(range(20, 29)), k=3, rounds=ROUNDS, params=SamplingParams(0.9, top_k=30, seed=7)),
    "sampling-k0": Spec((2, 9), k=0, rounds=ROUNDS, params=SamplingParams(1.2, top_p=0.9, seed=8)),
}


class AcceptRaises(TargetSession):
    """A session whose acceptance fails (a server fault after a successful forward)."""

    def accept(
        self, block: DraftBlock, base: int, logits: torch.Tensor, greedy_best: list[int] | None = None
    ) -> tuple[int, int]:
        raise RuntimeError("acceptance exploded")


def solo_verdicts(target: LoadedModel) -> dict[str, list[tuple[int, int]]]:
    """Each good session alone: its own private pool, one `verify` per round, no batcher. Its
    drafts come from the target (`TargetDrafts`): verdicts accept some and reject some."""
    out, drafts = {}, TargetDrafts(target)
    for name, spec in GOOD.items():
        s = TargetSession(name, target, spec.params, list(spec.prefix))
        s.prefill()
        out[name] = [s.verify(drafts(spec, s.seq.tokens, s.rounds, target.vocab_size)) for _ in range(spec.rounds)]
        assert_both_paths(name, spec, out[name])
    return out


def poisoned_rows(
    target: LoadedModel, pool: KVPool, rnd: int
) -> list[tuple[TargetSession, DraftBlock, type[BaseException], grpc.StatusCode | None]]:
    """(session, block, expected exception, expected status) for this round's poisoned rows. The
    forward breaker joins round 1 and the acceptance failure round 2 only, so the other rounds
    also show that the good rows really share one forward."""
    vocab, limit = target.vocab_size, target.context_limit

    def session(name: str, params: SamplingParams, prefix: list[int], cls: type = TargetSession) -> TargetSession:
        s = cls(name, target, params, prefix, pool=pool)
        s.prefill()
        return s

    q_ok = (SparseDist(ids=(3, 4), probs=(0.5, 0.5)),)
    q_nan = (SparseDist(ids=(3, 4), probs=(float("nan"), 0.5)),)
    invalid, out_of_range = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
    Row = tuple[TargetSession, DraftBlock, type[BaseException], grpc.StatusCode | None]
    rows: list[Row] = [
        (session("tiny-t", SamplingParams(1e-38), [5, 6]), DraftBlock(0, (3,), q_ok), StatusError, invalid),
        (session("nan-t", SamplingParams(float("nan")), [5, 6]), DraftBlock(0, (3,), q_ok), StatusError, invalid),
        (session("nan-q", SamplingParams(1.0), [5, 6]), DraftBlock(0, (3,), q_nan), StatusError, invalid),
        (session("bad-ids", SamplingParams(), [5, 6]), DraftBlock(0, (vocab + 3,)), StatusError, invalid),
        (session("overflow", SamplingParams(), [1] * 505), DraftBlock(0, (1,) * 10), StatusError, out_of_range),
        (session("oversize", SamplingParams(), [1, 2]), DraftBlock(0, (1,) * 600), StatusError, out_of_range),
        (
            session("round", SamplingParams(), [5, 6]),
            DraftBlock(3, (1,)),
            StatusError,
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ]
    assert all(len(r[0].seq.tokens) + r[1].k >= limit for r in rows if r[3] == out_of_range)
    if rnd == 1:  # passes every check, then breaks the whole forward: its last prefix token is no id
        rows.append(
            (
                session("breaker", SamplingParams(), [5, target.model.config.vocab_size + 1]),
                DraftBlock(0, (1,)),
                IndexError,
                None,
            )
        )
    if rnd == 2:
        rows.append(
            (session("raises", SamplingParams(), [5, 6], AcceptRaises), DraftBlock(0, (1,)), RuntimeError, None)
        )
    return rows


def test_poisoned_rows_fail_alone_at_the_batcher(target: LoadedModel) -> None:
    want, drafts = solo_verdicts(target), TargetDrafts(target)

    async def run() -> dict[str, list[Verdict]]:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target")
        pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
        good = {n: TargetSession(n, target, s.params, list(s.prefix), pool=pool) for n, s in GOOD.items()}
        for s in good.values():
            s.prefill()
        size = {"rows": 0}
        # A long window: rows really batch; it closes once every row of the round is in.
        batcher = Batcher(executor, 5.0, 16, lambda: size["rows"], metrics)
        batcher.start()
        got: dict[str, list[Verdict]] = {n: [] for n in GOOD}
        try:
            for rnd in range(ROUNDS):
                bad = poisoned_rows(target, pool, rnd)
                blocks = {n: drafts(GOOD[n], s.seq.tokens, s.rounds, target.vocab_size) for n, s in good.items()}
                size["rows"] = len(good) + len(bad)
                now = time.perf_counter()
                results = await asyncio.gather(
                    *(batcher.verify(good[n], blocks[n], now) for n in good),
                    *(batcher.verify(s, b, now) for s, b, _, _ in bad),
                    return_exceptions=True,
                )
                if rnd == 1:  # re-run alone: each row's compute is its own forward's (sequential
                    # runs within the round), once each row's was the whole call's, N x over
                    rerun = [v for v in results[: len(good)] if isinstance(v, Verdict)]
                    assert sum(v.compute_ms for v in rerun) <= (time.perf_counter() - now) * 1e3, rerun
                    # and the rest of the call as waiting: every row's time at the edge is still
                    # the whole call's (the verdicts go back together), none of it left to the network
                    at_edge = [v.queue_ms + v.compute_ms for v in rerun]
                    assert max(at_edge) - min(at_edge) < 1e-6 and min(v.queue_ms for v in rerun) > 0, rerun
                for n, v in zip(good, results, strict=False):
                    assert isinstance(v, Verdict), (n, rnd, v)
                    got[n].append(v)
                    # Batched with each other (and in round 2 with the row whose acceptance fails),
                    # except in the round whose forward broke: then each alone.
                    assert v.batch_rows == {1: 1, 2: len(good) + 1}.get(rnd, len(good)), (n, rnd, v)
                for (s, _, exc_type, code), result in zip(bad, results[len(good) :], strict=True):
                    assert isinstance(result, exc_type), (s.session_id, rnd, result)
                    if s.session_id == "raises":  # its own error, not one of the batcher's RuntimeErrors
                        assert str(result) == "acceptance exploded", result
                    if code is not None:
                        assert isinstance(result, StatusError) and result.code == code, (s.session_id, result)
                    assert s.rounds == 0 and s.seq.cached == len(s.seq.tokens) - 1  # as before the round
                    s.close()  # the batcher is idle: no forward holds the slot
        finally:
            await batcher.stop()
            executor.shutdown()
        return got

    metrics = EdgeMetrics()
    got = asyncio.run(run())
    for name in GOOD:
        assert [(v.n_accepted, v.next_token) for v in got[name]] == want[name], name
    # The metrics count forwards: one per round, but in the round whose batched forward broke
    # each good row was verified by a forward of its own (once that round counted as one).
    value = metrics.registry.get_sample_value
    assert value("gelato_edge_batches_total") == (ROUNDS - 1) + len(GOOD)
    assert value("gelato_edge_batch_rows_total") == ROUNDS * len(GOOD)


def test_poisoned_streams_fail_alone_over_grpc(pair: dict[str, Path], target: LoadedModel) -> None:
    edge = EdgeProcess(["--target", str(pair["target"]), "--batch-window-ms", "100"])
    drafts = TargetDrafts(target)  # the edge's own target, as loaded there
    try:
        with grpc.insecure_channel(edge.address) as channel:
            info = pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=10)
        fp, vocab = info.tokenizer_fingerprint, info.vocab_size
        solo = {n: run_session(edge.address, fp, s, vocab, drafts) for n, s in GOOD.items()}
        for name, verdicts in solo.items():
            assert_both_paths(name, GOOD[name], [v[:2] for v in verdicts])

        poison_codes: dict[str, list[grpc.StatusCode]] = {}
        stop = threading.Event()

        def poison(name: str, messages: list[pb.DeviceMessage | bytes]) -> None:
            codes = poison_codes.setdefault(name, [])
            while True:  # again and again, for as long as the good sessions run (once at least)
                with grpc.insecure_channel(edge.address) as channel:
                    stream = RawStream(channel)
                    for msg in messages:
                        stream.send(msg)
                    codes.append(stream.finish())
                if stop.wait(0.05):  # poison, don't starve the 2-core machine
                    return

        near = Spec(tuple([1] * 500), k=0, rounds=0)
        sampling = Spec((5, 6), k=1, rounds=0, params=SamplingParams(1.0))
        nan_q = pb.SparseDist(ids=[3], probs_f16=np.array([np.nan], "<f2").tobytes())
        poisons: dict[str, tuple[list[pb.DeviceMessage | bytes], grpc.StatusCode]] = {
            "tiny-temperature": (
                [
                    open_message(fp, sampling, sampling=pb.SamplingParams(temperature=1e-38)),
                    encode_block(make_block(sampling, [5, 6], 0, vocab)),
                ],
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "overflow": (
                [open_message(fp, near), pb.DeviceMessage(draft=pb.DraftBlock(round=0, ids=[1] * 20))],
                grpc.StatusCode.OUT_OF_RANGE,
            ),
            "oversize-name": (
                [open_message("x" * 65536, near, drafter_model="d" * 65536)],
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            "corrupt": ([open_message(fp, near), b"\x12\x05\x08"], grpc.StatusCode.INVALID_ARGUMENT),
            "nan-q": (
                [open_message(fp, sampling), pb.DeviceMessage(draft=pb.DraftBlock(round=0, ids=[3], q=[nan_q]))],
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        }
        threads = [threading.Thread(target=poison, args=(n, m), daemon=True) for n, (m, _) in poisons.items()]
        together: dict[str, list[tuple[int, int, int]]] = {}

        def good(name: str) -> None:
            together[name] = run_session(edge.address, fp, GOOD[name], vocab, drafts)

        goods = [threading.Thread(target=good, args=(n,)) for n in GOOD]
        for t in threads + goods:
            t.start()
        for t in goods:
            t.join(timeout=120)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        for name, (_, code) in poisons.items():
            assert poison_codes[name] and set(poison_codes[name]) == {code}, (name, poison_codes[name])
        for name in GOOD:
            assert [v[:2] for v in together[name]] == [v[:2] for v in solo[name]], name
        assert max(v[2] for vs in together.values() for v in vs) >= 2  # the good sessions did batch
        with grpc.insecure_channel(edge.address) as channel:
            assert pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=10).vocab_size == vocab
    finally:
        assert edge.stop() == 0


@pytest.mark.parametrize("temperature", [1e-38, float("nan")])
def test_unvalidated_tiny_temperature_is_its_own_invalid_argument(target: LoadedModel, temperature: float) -> None:
    """Even alone, the row that once produced NaN probabilities (INTERNAL) is INVALID_ARGUMENT."""
    s = TargetSession("t", target, SamplingParams(temperature), [5, 6])
    with pytest.raises(StatusError) as info:
        s.check(DraftBlock(0, (3,), (SparseDist(ids=(3,), probs=(1.0,)),)))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in info.value.details


class AcceptStops(TargetSession):
    """A session whose acceptance raises StopIteration (e.g. `next()` on an exhausted iterator)."""

    def accept(
        self, block: DraftBlock, base: int, logits: torch.Tensor, greedy_best: list[int] | None = None
    ) -> tuple[int, int]:
        raise StopIteration("nothing left")


def test_a_row_raising_stop_iteration_fails_alone_and_frees_the_batcher(target: LoadedModel) -> None:
    """A future refuses StopIteration: setting it raised TypeError in the event loop, the rows after
    it never got their verdicts and the batcher never ran another batch. Now it is that row's
    error, the other rows get their verdicts, and the next round runs."""
    want, drafts = solo_verdicts(target), TargetDrafts(target)

    async def run() -> tuple[dict[str, list[Verdict]], BaseException]:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target")
        pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
        stops = AcceptStops("stops", target, SamplingParams(), [5, 6], pool=pool)
        good = {n: TargetSession(n, target, s.params, list(s.prefix), pool=pool) for n, s in GOOD.items()}
        for s in (stops, *good.values()):
            s.prefill()
        size = {"rows": len(good) + 1}
        batcher = Batcher(executor, 5.0, 16, lambda: size["rows"], EdgeMetrics())
        batcher.start()
        got: dict[str, list[Verdict]] = {n: [] for n in GOOD}

        async def one_round(*extra: asyncio.Future[Verdict]) -> list[Verdict | BaseException]:
            now = time.perf_counter()
            blocks = {n: drafts(GOOD[n], s.seq.tokens, s.rounds, target.vocab_size) for n, s in good.items()}
            rows = [batcher.verify(good[n], blocks[n], now) for n in good]
            return await asyncio.wait_for(asyncio.gather(*extra, *rows, return_exceptions=True), 30)

        try:
            # The failing row is asked first, so it comes first in the batch.
            stopped, *results = await one_round(asyncio.ensure_future(batcher.verify(stops, DraftBlock(0, (1,)), 0.0)))
            size["rows"] = len(good)
            for rnd in range(ROUNDS):
                results = results if rnd == 0 else await one_round()
                for n, v in zip(good, results, strict=True):
                    assert isinstance(v, Verdict), (n, rnd, v)
                    got[n].append(v)
        finally:
            await batcher.stop()
            executor.shutdown()
        assert isinstance(stopped, BaseException)
        return got, stopped

    got, stopped = asyncio.run(run())
    assert isinstance(stopped, RuntimeError) and isinstance(stopped.__cause__, StopIteration)
    for name in GOOD:
        assert [(v.n_accepted, v.next_token) for v in got[name]] == want[name], name


def test_a_failure_after_the_batched_forward_reruns_only_the_rows_without_an_outcome(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the step between rows breaks after some rows were accepted (here the forward returns one
    row's logits too few), those rows keep their verdict (re-running them would advance them
    twice) and the rest are put back and verified alone: every verdict equals its solo one."""
    from gelato.edge import verifier

    want, drafts = solo_verdicts(target), TargetDrafts(target)
    real, calls = verifier.pooled_forward, [0]

    def one_short(rows: list[tuple[object, tuple[int, ...]]]) -> list[torch.Tensor]:
        calls[0] += 1
        out = real(rows)  # type: ignore[arg-type]
        return out[:-1] if calls[0] == 1 else out

    pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
    good = {n: TargetSession(n, target, s.params, list(s.prefix), pool=pool) for n, s in GOOD.items()}
    for s in good.values():
        s.prefill()
    got: dict[str, list[tuple[int, int]]] = {n: [] for n in GOOD}
    monkeypatch.setattr(verifier, "pooled_forward", one_short)
    for rnd in range(ROUNDS):
        pairs = [(s, drafts(GOOD[n], s.seq.tokens, s.rounds, target.vocab_size)) for n, s in good.items()]
        outcomes = verifier.verify_batch(pairs)
        for (n, s), out in zip(good.items(), outcomes, strict=True):
            assert isinstance(out, verifier.Accepted), (n, rnd, out)
            assert s.rounds == rnd + 1, (n, rnd)  # advanced once, not again by the re-run
            got[n].append((out.n_accepted, out.next_token))
    assert calls[0] == ROUNDS + 1  # the broken forward, one alone for its last row, then one per round
    for name in GOOD:
        assert got[name] == want[name], name


def test_the_batcher_frees_the_model_thread_whatever_resolving_a_batch_raises() -> None:
    """Whatever answering a batch's futures raises (here a result list one short), the batcher
    is free for the next batch afterwards; it stayed busy for good, and every session waited."""

    async def run() -> bool:
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher(executor, 0.0, 4, lambda: 1, EdgeMetrics())
        batcher.start()
        try:
            loop = asyncio.get_running_loop()
            fake = TargetSession.__new__(TargetSession)
            request = type("R", (), {"future": loop.create_future(), "session": fake})()
            assert batcher._free is not None
            batcher._free.clear()  # a batch is on the model thread
            with pytest.raises(ValueError):
                batcher._resolve([request, request], [RuntimeError("x")])  # type: ignore[list-item]
            return batcher._free.is_set()
        finally:
            await batcher.stop()
            executor.shutdown()

    assert asyncio.run(run())
