"""Driving device sessions for the reliability tests and the load benchmark (`gelato.benchmarks.load`):
deterministic well-formed sessions whose verdicts can be compared between runs, and raw Session
streams that send any bytes.

Contract: `make_block(spec, tokens, round)` is a pure function of the session's history, so a
session driven alone and the same session driven among others send identical blocks as long as
they got identical verdicts; `run_session(address, fp, spec)` drives one whole session over gRPC
and returns its `(a, next, batch_rows)` per round; `RawStream` sends raw bytes (corrupt protobuf
included) as Session messages and returns the final status.
"""

from __future__ import annotations

import queue
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from gelato.types import PROTOCOL_VERSION, DraftBlock, SamplingParams, SparseDist
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import encode_block, encode_sampling

SESSION_METHOD = "/gelato.v1.Gelato/Session"


@dataclass(frozen=True)
class Spec:
    """A well-formed session: its prompt, block size, rounds and sampling parameters."""

    prefix: tuple[int, ...]
    k: int
    rounds: int
    params: SamplingParams = field(default_factory=SamplingParams)


# How a session's blocks are made from its history (`make_block`, or any pure function of it).
Make = Callable[[Spec, list[int], int, int], DraftBlock]


def make_block(spec: Spec, tokens: list[int], rnd: int, vocab: int) -> DraftBlock:
    """Drafts as a function of the history only. Greedy: the last k tokens again (a cheap n-gram
    guess the tiny target sometimes accepts). Sampling: each draft drawn from a random 4-token
    support whose float16 probabilities are sent exactly as q."""
    rng = random.Random(len(tokens) * 7919 + tokens[-1] * 31 + spec.k)
    if spec.params.greedy:
        ids = tuple((tokens * spec.k)[-spec.k :]) if spec.k else ()
        return DraftBlock(round=rnd, ids=ids)
    ids_out, qs = [], []
    for _ in range(spec.k):
        q = random_q(rng, vocab)
        ids_out.append(rng.choices(q.ids, weights=q.probs)[0])
        qs.append(q)
    return DraftBlock(round=rnd, ids=tuple(ids_out), q=tuple(qs))


def random_q(rng: random.Random, vocab: int) -> SparseDist:
    """A random 4-token support with float16 probabilities (sent exactly as they are)."""
    support = rng.sample(range(1, vocab), 4)
    probs = np.asarray([rng.uniform(0.1, 1.0) for _ in support], dtype=np.float16)
    return SparseDist(ids=tuple(support), probs=tuple(float(p) for p in probs))


def open_message(fp: str, spec: Spec, **overrides: object) -> pb.DeviceMessage:
    fields: dict[str, object] = {
        "protocol_version": PROTOCOL_VERSION,
        "tokenizer_fingerprint": fp,
        "drafter_model": "reliability",
        "prefix_ids": list(spec.prefix),
        "sampling": encode_sampling(spec.params),
        "max_new_tokens": 0,
    }
    fields.update(overrides)
    return pb.DeviceMessage(open=pb.OpenSession(**fields))  # type: ignore[arg-type]


class RawStream:
    """One Session stream fed message by message (protobuf or raw bytes) from a test thread."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 60.0) -> None:
        self._out: queue.Queue[bytes | None] = queue.Queue()
        method = channel.stream_stream(
            SESSION_METHOD, request_serializer=lambda b: b, response_deserializer=pb.EdgeMessage.FromString
        )
        self.call = method(self._requests(), timeout=timeout_s)

    def _requests(self) -> Iterator[bytes]:
        while (data := self._out.get()) is not None:
            yield data

    def send(self, msg: pb.DeviceMessage | bytes) -> None:
        self._out.put(msg if isinstance(msg, bytes) else msg.SerializeToString())

    def recv(self) -> pb.EdgeMessage:
        return next(self.call)  # type: ignore[call-overload, no-any-return]

    def finish(self) -> grpc.StatusCode:
        """Half-close and read to the end; the stream's final status."""
        self._out.put(None)
        try:
            for _ in self.call:  # type: ignore[attr-defined]
                pass
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


def run_session(address: str, fp: str, spec: Spec, vocab: int, make: Make = make_block) -> list[tuple[int, int, int]]:
    """Drive one well-formed session to its end; (a, next, batch_rows) per round. `make` drafts each
    block from the history (any pure function of it, as `make_block`)."""
    with grpc.insecure_channel(address) as channel:
        stream = RawStream(channel)
        stream.send(open_message(fp, spec))
        assert stream.recv().WhichOneof("kind") == "opened"
        tokens, verdicts = list(spec.prefix), []
        for rnd in range(spec.rounds):
            block = make(spec, tokens, rnd, vocab)
            stream.send(encode_block(block))
            v = stream.recv().verdict
            tokens += [*block.ids[: v.n_accepted], v.next_token]
            verdicts.append((v.n_accepted, v.next_token, v.batch_rows))
        stream.send(pb.DeviceMessage(close=pb.CloseSession()))
        assert stream.finish() == grpc.StatusCode.OK
    return verdicts
