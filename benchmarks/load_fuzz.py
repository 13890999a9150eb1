"""The protocol fuzzer: malformed and adversarial Session messages, each with the statuses an edge
may answer it with (the reliability tests' `tests/reliability/test_fuzz.py` and the load
benchmark's fuzz phase, `gelato.benchmarks.load_traffic`, run the same cases).

Contract: `Fuzzer(rng, fingerprint, vocab, context_limit, max_draft).generate(n)` returns `n`
cases `(name, messages, allowed statuses)` from the seeded `rng` (the same seed: the same cases),
plus one oversize message; `run_case(channel, messages)` sends one case on a raw Session stream and
returns its final status and details. Every case changes ONE thing from a well-formed stream, so
its status is known exactly: each field of OpenSession, DraftBlock and SparseDist out of range
(NaN/inf/negative float16 probabilities included), wrong rounds, draft before open, double open,
blocks past the context limit or the reservation; send-ahead blocks (a wrong parent, a round
verified already or too far ahead, an empty one with q, a guess out of the vocabulary, too many
ids), `Generate` (before open, a wrong round, no tokens, a valid one), a close first or followed by
more, and valid extremes of the sampling parameters (answered, never INTERNAL). Cases that
corrupt the encoding itself (random bytes, truncated protobuf, bad UTF-8, flipped bits, a message
over the 4 MiB limit) are allowed any status that names what happened (INVALID_ARGUMENT for bytes
that do not parse; RESOURCE_EXHAUSTED, gRPC's own, for the oversize message; whatever the bytes
decode to when they do parse).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import grpc
import numpy as np

from gelato.benchmarks.load_streams import RawStream
from gelato.types import PROTOCOL_VERSION
from gelato.v1 import gelato_pb2 as pb

SEED, CASES = 1515, 320
Code = grpc.StatusCode
INVALID, PRECONDITION, OUT_OF_RANGE = Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE
PARSED_ANYHOW = {Code.OK, INVALID, PRECONDITION, OUT_OF_RANGE}  # bytes that happened to decode
Case = tuple[str, list[bytes], set[grpc.StatusCode]]


class Fuzzer:
    """Generates cases for an edge with this fingerprint, vocabulary and context limit."""

    def __init__(self, rng: random.Random, fp: str, vocab: int, limit: int, max_draft: int) -> None:
        self.rng, self.fp, self.vocab, self.limit, self.max_draft = rng, fp, vocab, limit, max_draft

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def open(self, sampled: bool = False, **fields: object) -> pb.DeviceMessage:
        """A well-formed open (sampling at 0.8 when `sampled`), with `fields` overriding: a
        `sampling=` SamplingParams message replaces the sampling parameters whole."""
        msg = pb.OpenSession(
            protocol_version=PROTOCOL_VERSION,
            tokenizer_fingerprint=self.fp,
            drafter_model="fuzz",
            prefix_ids=self.ids(self.rng.randint(1, 20)),
            sampling=pb.SamplingParams(temperature=0.8 if sampled else 0.0, top_k=20, seed=self.rng.randrange(99)),
            max_new_tokens=self.rng.choice([0, 64]),
        )
        for name, value in fields.items():
            if name == "sampling":
                msg.sampling.CopyFrom(value)  # type: ignore[arg-type]
            elif name == "prefix_ids":
                del msg.prefix_ids[:]
                msg.prefix_ids.extend(value)  # type: ignore[call-overload]
            else:
                setattr(msg, name, value)
        return pb.DeviceMessage(open=msg)

    def q(self, x: int, probs: list[float] | None = None, ids: list[int] | None = None) -> pb.SparseDist:
        support = ids if ids is not None else [x, *self.rng.sample([i for i in range(self.vocab) if i != x], 3)]
        p = probs if probs is not None else [self.rng.uniform(0.05, 1.0) for _ in support]
        return pb.SparseDist(ids=support, probs_f16=np.asarray(p, dtype="<f2").tobytes())

    def draft(self, rnd: int, sampling: bool, k: int | None = None) -> pb.DeviceMessage:
        ids = self.ids(self.rng.randint(0, 6) if k is None else k)
        qs = [self.q(x) for x in ids] if sampling else []
        return pb.DeviceMessage(draft=pb.DraftBlock(round=rnd, ids=ids, q=qs))

    def session(self, bad: pb.DeviceMessage | bytes, sampling: bool, open_msg: pb.DeviceMessage | None = None) -> list:
        """A well-formed open and 0-2 good rounds, then the bad message (what the case is about)."""
        good = self.rng.randint(0, 2)
        msgs = [open_msg or self.open(sampling), *(self.draft(r, sampling) for r in range(good))]
        if isinstance(bad, pb.DeviceMessage) and bad.WhichOneof("kind") == "draft":
            bad.draft.round += good  # the round the session is at, unless the case is about rounds
        return [*msgs, bad]

    # One generator per kind of case; each returns (name, messages, allowed statuses).
    def open_field(self) -> Case:
        f = self.rng.choice(["version", "fingerprint", "name", "prefix", "temperature", "top_p"])
        after = self.draft(0, False)
        if f == "version":
            wrong = self.rng.choice([0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 99, 2**32 - 1])
            msg, code = self.open(protocol_version=wrong), PRECONDITION
        elif f == "fingerprint":
            msg, code = self.open(tokenizer_fingerprint=self.rng.choice(["", "x", "é" * 40, "f" * 65536])), PRECONDITION
        elif f == "name":  # echoed in the error: clipped, or the status itself is too big to send
            msg, code = self.open(tokenizer_fingerprint="no", drafter_model="d" * 65536), PRECONDITION
        elif f == "prefix":
            prefix = self.rng.choice(
                [[], [-1], [self.vocab], [2**31 - 1], [-(2**31)], self.ids(self.limit + self.rng.randrange(100))]
            )
            msg, code = self.open(prefix_ids=prefix), INVALID
        elif f == "temperature":
            t = self.rng.choice([float("nan"), float("inf"), float("-inf"), -1.0, 1e-38, 1e-45, 5e-5])
            msg, code = self.open(sampling=pb.SamplingParams(temperature=t)), INVALID
        else:
            p = self.rng.choice([float("nan"), float("inf"), float("-inf"), -0.1, 1.001, 2.0, 1e30])
            msg, code = self.open(sampling=pb.SamplingParams(temperature=1.0, top_p=p)), INVALID
        return f"open.{f}", [msg.SerializeToString(), after.SerializeToString()], {code}

    def draft_field(self) -> Case:
        sampling = self.rng.random() < 0.6
        f = self.rng.choice(
            ["ids", "oversize", "round", "greedy-q"]
            if not sampling
            else ["ids", "round", "no-q", "q-count", "probs", "bytes", "dup", "q-ids", "support", "empty"]
        )
        x = self.ids(1)[0]
        code = INVALID
        if f == "ids":
            bad = self.draft(0, False, 0)
            bad.draft.ids.extend([x, self.rng.choice([-1, self.vocab, 2**31 - 1, -(2**31)])])
            if sampling:
                bad.draft.q.extend([self.q(x), self.q(x)])
        elif f == "oversize":
            bad = self.draft(0, False, self.max_draft + self.rng.randint(1, 50))
        elif f == "round":
            bad, code = self.draft(0, sampling), PRECONDITION
            bad.draft.round = self.rng.choice([1, 2, 7, 2**32 - 4])  # never the session's (0-2)
        elif f == "greedy-q":
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[self.q(x)]))
        elif f == "no-q":
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x]))
        elif f == "q-count":
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[self.q(x), self.q(x)]))
        elif f == "probs":  # NaN, inf, negative or all-zero float16 probabilities
            p = self.rng.choice([float("nan"), float("inf"), float("-inf"), -1.0, 0.0])
            q = self.q(x, [p, 0.0] if p == 0 else [p, 0.5], [x, (x + 1) % self.vocab])
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[q]))
        elif f == "bytes":
            q = self.q(x)
            q.probs_f16 = q.probs_f16[: self.rng.choice([0, 1, 3])]
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[q]))
        elif f == "dup":
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[self.q(x, [0.5, 0.5], [x, x])]))
        elif f == "q-ids":
            out = self.rng.choice([-5, self.vocab + 3])
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[self.q(x, [0.5, 0.5], [x, out])]))
        elif f == "support":  # the draft is not in the support it was supposedly drawn from
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[self.q(x, [1.0], [(x + 1) % self.vocab])]))
        else:
            bad = pb.DeviceMessage(draft=pb.DraftBlock(ids=[x], q=[pb.SparseDist()]))
        return f"draft.{f}", [m.SerializeToString() for m in self.session(bad, sampling)], {code}

    def protocol(self) -> Case:
        f = self.rng.choice(["draft-before-open", "double-open", "empty", "context", "reservation"])
        if f == "draft-before-open":
            return f, [self.draft(0, False).SerializeToString()], {PRECONDITION}
        if f == "double-open":
            return f, [m.SerializeToString() for m in self.session(self.open(), False)], {PRECONDITION}
        if f == "empty":
            return f, [m.SerializeToString() for m in self.session(pb.DeviceMessage(), False)], {INVALID}
        if f == "context":  # a block that would pass the context limit
            n = self.limit - self.rng.randint(2, 10)
            msgs = [self.open(prefix_ids=self.ids(n)), self.draft(0, False, self.max_draft)]
            return f, [m.SerializeToString() for m in msgs], {OUT_OF_RANGE}
        msgs = [self.open(max_new_tokens=1), *(self.draft(r, False, self.max_draft) for r in range(3))]
        return f, [m.SerializeToString() for m in msgs], {OUT_OF_RANGE}

    def flow(self) -> Case:
        """Send-ahead blocks, `Generate`, close, and valid extremes of the sampling parameters."""
        good = self.rng.randint(2, 3)
        opened = [self.open(False), *(self.draft(r, False) for r in range(good))]
        x = self.ids(1)[0]

        def ahead(rnd: int, ids: list[int], **fields: object) -> pb.DeviceMessage:
            return pb.DeviceMessage(draft=pb.DraftBlock(round=rnd, ids=ids, parent_round=rnd - 1, **fields))  # type: ignore[arg-type]

        def gen(rnd: int, n: int) -> pb.DeviceMessage:
            return pb.DeviceMessage(generate=pb.Generate(round=rnd, max_tokens=n))

        cases: dict[str, tuple[list[pb.DeviceMessage], set[grpc.StatusCode]]] = {
            "gen-before-open": ([gen(0, 5)], {PRECONDITION}),
            "gen-round": ([*opened, gen(good + self.rng.randint(1, 5), 5)], {PRECONDITION}),
            "gen-zero": ([*opened, gen(good, 0)], {INVALID}),
            "gen-ok": ([*opened, gen(good, 3)], {Code.OK}),
            # parent_round must be round - 1
            "ahead-parent": (
                [*opened, pb.DeviceMessage(draft=pb.DraftBlock(round=good, ids=[x], parent_round=good))],
                {INVALID},
            ),
            "ahead-old": ([*opened, ahead(good - 1, [x])], {PRECONDITION}),  # a round verified already
            # past the edge's max_ahead_rounds (FAILED_PRECONDITION where send-ahead is off)
            "ahead-far": ([*opened, ahead(good + 1000, [x])], {OUT_OF_RANGE, PRECONDITION}),
            "ahead-empty-q": ([self.open(True), self.draft(0, True), ahead(1, [], q=[self.q(x)])], {INVALID}),
            "ahead-guess": ([*opened, ahead(good, [self.vocab + 1, x])], {INVALID}),
            "ahead-oversize": ([*opened, ahead(good, self.ids(self.max_draft + 2))], {INVALID}),
            "close-first": ([pb.DeviceMessage(close=pb.CloseSession())], {Code.OK}),
            # what follows a close is never read: the stream ends OK at the close
            "after-close": ([*opened, pb.DeviceMessage(close=pb.CloseSession()), self.draft(0, False)], {Code.OK}),
        }
        f = self.rng.choice([*cases, "extreme"])
        if f == "extreme":  # valid extremes of the sampling parameters: a verdict, never INTERNAL
            sampling = self.rng.choice(
                [
                    pb.SamplingParams(temperature=1.0, top_p=0.5),
                    pb.SamplingParams(temperature=1.0, top_p=1.4e-45),
                    pb.SamplingParams(temperature=0.9, top_k=2**32 - 1),
                    pb.SamplingParams(temperature=0.7, seed=2**64 - 1),
                    pb.SamplingParams(temperature=3.4e38),
                ]
            )
            msgs = [self.open(True, sampling=sampling), self.draft(0, True, 3), self.draft(1, True, 0)]
            return f"flow.{f}", [m.SerializeToString() for m in msgs], {Code.OK}
        msgs, codes = cases[f]
        return f"flow.{f}", [m.SerializeToString() for m in msgs], codes

    def encoding(self) -> Case:
        f = self.rng.choice(["random", "random-mid", "truncated", "utf8", "bitflip"])
        valid = self.open().SerializeToString()
        if f == "random":
            return f, [self.rng.randbytes(self.rng.randint(1, 300))], PARSED_ANYHOW
        if f == "random-mid":
            return f, [valid, self.rng.randbytes(self.rng.randint(1, 300))], PARSED_ANYHOW
        if f == "truncated":  # the oneof is one length-delimited field: any cut breaks it
            return f, [valid[: self.rng.randrange(1, len(valid))]], {INVALID}
        if f == "utf8":
            bad = self.rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xfe"])
            field = self.rng.choice([2, 3])  # tokenizer_fingerprint, drafter_model
            inner = bytes([field << 3 | 2, len(bad)]) + bad
            return f, [bytes([0x0A, len(inner)]) + inner], {INVALID}
        flipped = bytearray(valid)
        for _ in range(self.rng.randint(1, 4)):
            flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
        return f, [bytes(flipped)], PARSED_ANYHOW

    def generate(self, n: int) -> list[Case]:
        kinds: list[Callable[[], Case]] = [self.open_field, self.draft_field, self.protocol, self.flow, self.encoding]
        cases = [self.rng.choice(kinds)() for _ in range(n)]
        oversize = pb.DeviceMessage(open=pb.OpenSession(drafter_model="x" * (17 * 2**20))).SerializeToString()
        return [*cases, ("oversize", [oversize], {Code.RESOURCE_EXHAUSTED})]


def run_case(channel: grpc.Channel, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    stream = RawStream(channel, timeout_s=30)
    for data in messages:
        stream.send(data)
    code = stream.finish()
    return code, "" if code == Code.OK else (stream.call.details() or "")  # type: ignore[attr-defined]
