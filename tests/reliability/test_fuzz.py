"""Protocol fuzzer against a real edge process: a few hundred malformed and adversarial messages
(fixed seed; the cases and their allowed statuses: `gelato.benchmarks.load_fuzz`) each get a
precise status, never UNKNOWN or INTERNAL; the edge is still SERVING afterwards and holds no
session; and well-formed sessions running all along, one greedy and one sampling (drafts the
target takes some of), produce exactly the verdicts they produce alone.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gelato.benchmarks.load_fuzz import CASES, SEED, Code, Fuzzer, run_case
from gelato.benchmarks.load_streams import Spec, run_session
from gelato.models import LoadedModel
from gelato.types import SamplingParams
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess
from tests.reliability.drafts import TargetDrafts, assert_both_paths


def test_protocol_fuzz(pair: dict[str, Path], target: LoadedModel) -> None:
    edge = EdgeProcess(["--target", str(pair["target"]), "--batch-window-ms", "5"])
    drafts = TargetDrafts(target)  # drafts the edge's target takes some of: acceptance and rollback run
    try:
        with grpc.insecure_channel(edge.address) as channel:
            info = pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=10)
            fuzzer = Fuzzer(random.Random(SEED), info.tokenizer_fingerprint, info.vocab_size, info.context_limit, 32)
            cases = fuzzer.generate(CASES)
            # A greedy and a sampling session (its draws keyed by its seed and positions).
            goods = {
                "greedy": Spec(tuple(range(11, 19)), k=4, rounds=12, params=SamplingParams()),
                "sampling": Spec(tuple(range(30, 37)), k=3, rounds=12, params=SamplingParams(0.9, top_k=30, seed=5)),
            }
            fp, vocab = info.tokenizer_fingerprint, info.vocab_size
            alone = {n: [v[:2] for v in run_session(edge.address, fp, s, vocab, drafts)] for n, s in goods.items()}
            for name, spec in goods.items():
                assert_both_paths(name, spec, alone[name])

            done, errors = threading.Event(), []
            runs: dict[str, list[list[tuple[int, int]]]] = {n: [] for n in goods}

            def well_formed() -> None:  # again and again for as long as the fuzz runs
                try:
                    while not done.is_set():
                        for name, spec in goods.items():
                            runs[name].append([v[:2] for v in run_session(edge.address, fp, spec, vocab, drafts)])
                except BaseException as exc:  # a broken session fails the test, not just this thread
                    errors.append(exc)

            thread = threading.Thread(target=well_formed, daemon=True)
            thread.start()
            wrong = []
            for name, messages, allowed in cases:
                code, details = run_case(channel, messages)
                if code not in allowed or code in (Code.UNKNOWN, Code.INTERNAL):
                    wrong.append((name, code.name, details[:200], sorted(c.name for c in allowed)))
            info_raw = channel.unary_unary("/gelato.v1.Gelato/Info", request_serializer=lambda b: b)
            # Truncated fields must be refused; random bytes may also parse (as unknown fields,
            # which proto3 keeps): then an ordinary answer is right.
            for data, must_fail in ((b"\x08", True), (b"\x0a\x05ab", True), (fuzzer.rng.randbytes(50), False)):
                try:
                    info_raw(data, timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() != Code.INVALID_ARGUMENT:
                        wrong.append(("info", exc.code().name, exc.details(), ["INVALID_ARGUMENT"]))
                else:
                    if must_fail:
                        wrong.append(("info", "OK", repr(data), ["INVALID_ARGUMENT"]))
            done.set()
            thread.join(timeout=60)
            assert not thread.is_alive(), "the well-formed session never finished"
            assert not errors, f"the well-formed session failed while the fuzz ran: {errors[0]!r}"
            assert not wrong, f"{len(wrong)} of {len(cases)} cases: {wrong[:10]}"
            for name in goods:
                assert runs[name] and all(r == alone[name] for r in runs[name]), (name, alone[name], runs[name])
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            deadline = time.monotonic() + 10  # sessions are freed on the model thread
            while pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=10).active_sessions:
                assert time.monotonic() < deadline, "sessions left open after the fuzz"
                time.sleep(0.1)
    finally:
        assert edge.stop() == 0
