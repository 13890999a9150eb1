"""Bad input gets a precise gRPC status, ends only its own stream, and the edge keeps serving.

Runs against a real `gelato-edge` process over loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gelato.edge.metrics import REJECT_REASONS
from gelato.models import load_model
from gelato.types import PROTOCOL_VERSION
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess
from tests.edge.test_batched_grpc import free_port, scrape


@pytest.fixture(scope="module")
def stub(edge: EdgeProcess) -> Iterator[pb_grpc.GelatoStub]:
    with grpc.insecure_channel(edge.address) as channel:
        yield pb_grpc.GelatoStub(channel)


@pytest.fixture(scope="module")
def fingerprint(pair: dict[str, Path]) -> str:
    return load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu").fingerprint


def open_msg(fp: str, prefix: list[int] | None = None, temperature: float = 0.0, **kw: object) -> pb.DeviceMessage:
    fields = {
        "protocol_version": PROTOCOL_VERSION,
        "tokenizer_fingerprint": fp,
        "drafter_model": "test-drafter",
        "prefix_ids": prefix if prefix is not None else [5, 6, 7],
        "sampling": pb.SamplingParams(temperature=temperature, seed=1),
        "max_new_tokens": 8,
    }
    fields.update(kw)
    return pb.DeviceMessage(open=pb.OpenSession(**fields))  # type: ignore[arg-type]


def draft(round_no: int, ids: list[int], q: list[pb.SparseDist] | None = None) -> pb.DeviceMessage:
    return pb.DeviceMessage(draft=pb.DraftBlock(round=round_no, ids=ids, q=q or []))


def run_stream(stub: pb_grpc.GelatoStub, messages: list[pb.DeviceMessage]) -> list[pb.EdgeMessage]:
    return list(stub.Session(iter(messages), timeout=30))


def expect_status(stub: pb_grpc.GelatoStub, messages: list[pb.DeviceMessage], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        run_stream(stub, messages)
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def test_info(stub: pb_grpc.GelatoStub, fingerprint: str) -> None:
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert info.protocol_version == PROTOCOL_VERSION
    assert info.tokenizer_fingerprint == fingerprint
    assert info.vocab_size > 0 and info.context_limit == 512 and info.max_draft_tokens == 32


def test_health_serving(edge: EdgeProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(edge.address) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_tokenizer_mismatch_names_both_models(stub: pb_grpc.GelatoStub) -> None:
    details = expect_status(stub, [open_msg("not-the-same")], grpc.StatusCode.FAILED_PRECONDITION)
    assert "tokenizer mismatch" in details and "test-drafter" in details and "target" in details


def test_protocol_version_mismatch(stub: pb_grpc.GelatoStub, fingerprint: str) -> None:
    msg = open_msg(fingerprint, protocol_version=99)
    assert "protocol version 99" in expect_status(stub, [msg], grpc.StatusCode.FAILED_PRECONDITION)


@pytest.mark.parametrize(
    ("messages", "code", "needle"),
    [
        (lambda fp: [open_msg(fp, prefix=[])], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (lambda fp: [open_msg(fp, prefix=[1, 10**6])], grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (lambda fp: [open_msg(fp, prefix=[1] * 600)], grpc.StatusCode.INVALID_ARGUMENT, "context limit"),
        (lambda fp: [draft(0, [1])], grpc.StatusCode.FAILED_PRECONDITION, "before open"),
        (lambda fp: [open_msg(fp), open_msg(fp)], grpc.StatusCode.FAILED_PRECONDITION, "already open"),
        (lambda fp: [open_msg(fp), draft(0, [-3])], grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (lambda fp: [open_msg(fp), draft(0, [1] * 33)], grpc.StatusCode.INVALID_ARGUMENT, "exceeds"),
        (lambda fp: [open_msg(fp), draft(3, [1])], grpc.StatusCode.FAILED_PRECONDITION, "round"),
        (lambda fp: [open_msg(fp), pb.DeviceMessage()], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (
            lambda fp: [open_msg(fp), draft(0, [1], [pb.SparseDist(ids=[1])])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "greedy",
        ),
        (
            lambda fp: [open_msg(fp, temperature=1.0), draft(0, [1])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "one q per draft",
        ),
        (
            lambda fp: [open_msg(fp, temperature=1.0), draft(0, [1], [pb.SparseDist(ids=[1, 2], probs_f16=b"\0")])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "bytes",
        ),
        (
            lambda fp: [
                open_msg(fp, temperature=1.0),
                draft(0, [1], [pb.SparseDist(ids=[2], probs_f16=np.array([1.0], "<f2").tobytes())]),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "not in its own support",
        ),
        (  # was decoded id by id on the event loop, stalling every other session (0.5 s at 5M ids);
            # within the 4 MiB message limit (a larger one is gRPC's RESOURCE_EXHAUSTED, unparsed)
            lambda fp: [
                open_msg(fp, temperature=1.0),
                draft(0, [1], [pb.SparseDist(ids=[1] * 1_000_000, probs_f16=b"\x00\x3c" * 1_000_000)]),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "a support of 1000000 ids exceeds the limit of 1024",
        ),
        (  # 3 + 1 + 32 + 1 tokens reserved: by round 2 at the latest a 32-token block passes them
            lambda fp: [open_msg(fp, max_new_tokens=1), *(draft(r, [1] * 32) for r in range(3))],
            grpc.StatusCode.OUT_OF_RANGE,
            "reserved at open",
        ),
        (
            lambda fp: [open_msg(fp, sampling=pb.SamplingParams(temperature=-1.0))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (  # was INTERNAL (NaN probabilities), and failed every session batched with it
            lambda fp: [open_msg(fp, sampling=pb.SamplingParams(temperature=1e-38)), draft(0, [])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            lambda fp: [open_msg(fp, sampling=pb.SamplingParams(temperature=float("inf")))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (  # NaN used to pass as "off"
            lambda fp: [open_msg(fp, sampling=pb.SamplingParams(temperature=1.0, top_p=float("nan")))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            lambda fp: [open_msg(fp, sampling=pb.SamplingParams(temperature=1.0, top_p=-0.5))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            lambda fp: [
                open_msg(fp, temperature=1.0),
                draft(0, [1], [pb.SparseDist(ids=[1], probs_f16=np.array([np.nan], "<f2").tobytes())]),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "finite",
        ),
    ],
)
def test_bad_input_precise_status(stub: pb_grpc.GelatoStub, fingerprint: str, messages, code, needle) -> None:  # type: ignore[no-untyped-def]
    assert needle in expect_status(stub, messages(fingerprint), code)
    # The server is still up and serves a clean session afterwards.
    out = run_stream(stub, [open_msg(fingerprint), draft(0, [1, 2]), draft(1, [])])
    assert out[0].WhichOneof("kind") == "opened"
    assert [m.verdict.round for m in out[1:]] == [0, 1]
    assert stub.Info(pb.InfoRequest(), timeout=10).active_sessions == 0


def test_context_limit_during_generation(stub: pb_grpc.GelatoStub, fingerprint: str) -> None:
    msgs = [open_msg(fingerprint, prefix=[1] * 505), draft(0, [1] * 8)]
    assert "context limit" in expect_status(stub, msgs, grpc.StatusCode.OUT_OF_RANGE)


def test_admission_control(pair: dict[str, Path], fingerprint: str) -> None:
    """Beyond --max-sessions, opening answers RESOURCE_EXHAUSTED; the open session keeps working."""
    metrics_port = free_port()
    edge = EdgeProcess(["--target", str(pair["target"]), "--max-sessions", "1", "--metrics-port", str(metrics_port)])
    try:
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GelatoStub(channel)
            requests: list[pb.DeviceMessage] = [open_msg(fingerprint)]
            first = stub.Session(iter_until_closed(requests), timeout=60)
            assert next(first).WhichOneof("kind") == "opened"
            expect_status(stub, [open_msg(fingerprint)], grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert rejected(metrics_port) == {"admission": 1, "client_limit": 0, "kv_memory": 0, "waiting_streams": 0}
            requests.append(draft(0, [1, 2, 3]))
            assert next(first).verdict.round == 0
            requests.append(pb.DeviceMessage(close=pb.CloseSession()))
            assert list(first) == []
            out = run_stream(stub, [open_msg(fingerprint), draft(0, [])])  # the slot is free again
            assert out[1].verdict.round == 0
    finally:
        assert edge.stop() == 0  # SIGTERM: graceful shutdown, exit status 0


def rejected(metrics_port: int) -> dict[str, float]:
    """`gelato_edge_sessions_rejected_total` by reason, scraped from a running edge."""
    scraped = scrape(metrics_port)
    return {r: scraped[f'gelato_edge_sessions_rejected_total{{reason="{r}"}}'] for r in REJECT_REASONS}


def iter_until_closed(requests: list[pb.DeviceMessage]) -> Iterator[pb.DeviceMessage]:
    """Yield requests as the test appends them, until a close message."""
    import time

    sent = 0
    while True:
        while sent < len(requests):
            yield requests[sent]
            if requests[sent].WhichOneof("kind") == "close":
                return
            sent += 1
        time.sleep(0.01)


def test_log_heavy_edge_keeps_serving(pair: dict[str, Path], fingerprint: str) -> None:
    """1000 rejected streams at --log-level info log ~100 KB, more than a pipe buffer holds: the
    edge's output is read as it comes (gelato.benchmarks.procs.Edge), so the edge never blocks on its log."""
    edge = EdgeProcess(["--target", str(pair["target"]), "--log-level", "info"])
    try:
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GelatoStub(channel)
            for _ in range(1000):
                expect_status(stub, [draft(0, [1])], grpc.StatusCode.FAILED_PRECONDITION)
            out = run_stream(stub, [open_msg(fingerprint), draft(0, [1, 2])])
            assert out[1].verdict.round == 0
    finally:
        assert edge.stop() == 0
    assert sum("draft block before open" in line for line in edge.output().splitlines()) >= 400


def test_oversize_client_strings_are_clipped(stub: pb_grpc.GelatoStub) -> None:
    """A 64 KiB drafter name with a wrong fingerprint: echoed whole, the status outgrew gRPC's
    metadata limit and the client saw RESOURCE_EXHAUSTED instead of the real error."""
    msg = open_msg("f" * 65536, drafter_model="d" * 65536)
    details = expect_status(stub, [msg], grpc.StatusCode.FAILED_PRECONDITION)
    assert "tokenizer mismatch" in details and "65536 characters" in details and len(details) < 1000


def raw_session(edge: EdgeProcess, messages: list[bytes]) -> grpc.RpcError:
    """Send raw bytes as Session messages (no serializer: corrupt protobuf goes out as is)."""
    with grpc.insecure_channel(edge.address) as channel:
        call = channel.stream_stream(
            "/gelato.v1.Gelato/Session", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter(messages), timeout=30))
    return info.value


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05\x12\x03\xff\xfe\xfd",  # open.tokenizer_fingerprint with bad UTF-8
        b"\x0a\x40\x08\x01",  # open claims 64 bytes, has 2
        b"\xff\xff\xff\xff",  # not protobuf at all
        b"\x08",  # truncated varint
    ],
)
def test_unparsable_bytes_are_invalid_argument(edge: EdgeProcess, stub: pb_grpc.GelatoStub, data: bytes) -> None:
    """Bytes that do not parse were UNKNOWN ("Unexpected DecodeError"), on Session and on Info."""
    err = raw_session(edge, [data])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed DeviceMessage" in (err.details() or "")
    fp = stub.Info(pb.InfoRequest(), timeout=10).tokenizer_fingerprint
    err = raw_session(edge, [open_msg(fp).SerializeToString(), data])  # mid-stream, too
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    with grpc.insecure_channel(edge.address) as channel:
        info = channel.unary_unary("/gelato.v1.Gelato/Info", request_serializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as bad_info:
            info(b"\x08", timeout=10)
    assert bad_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Info(pb.InfoRequest(), timeout=10).active_sessions == 0


def test_a_message_over_the_limit_is_refused_by_grpc_unparsed(edge: EdgeProcess, stub: pb_grpc.GelatoStub) -> None:
    """Messages are parsed on the event loop: one over `MAX_MESSAGE_BYTES` (4 MiB; it was 16,
    ~37 ms of parsing each) is gRPC's RESOURCE_EXHAUSTED before it reaches the service, and the
    edge serves on."""
    from gelato.channel import MAX_MESSAGE_BYTES

    assert MAX_MESSAGE_BYTES == 4 * 2**20
    big = pb.DeviceMessage(open=pb.OpenSession(drafter_model="x" * (MAX_MESSAGE_BYTES + 1))).SerializeToString()
    err = raw_session(edge, [big])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert stub.Info(pb.InfoRequest(), timeout=10).active_sessions == 0


def generate(round_no: int, max_tokens: int, per_message: int = 0) -> pb.DeviceMessage:
    return pb.DeviceMessage(generate=pb.Generate(round=round_no, max_tokens=max_tokens, tokens_per_message=per_message))


def streamed_tokens(replies: list[pb.EdgeMessage]) -> list[list[int]]:
    return [[m.verdict.next_token, *m.verdict.more_tokens] for m in replies if m.WhichOneof("kind") == "verdict"]


def flat(chunks: list[list[int]]) -> list[int]:
    return [t for chunk in chunks for t in chunk]


def test_edge_only_generation_sends_several_tokens_a_message_when_asked(
    stub: pb_grpc.GelatoStub, fingerprint: str
) -> None:
    """`tokens_per_message`: a session alone on the edge gets its tokens that many to a message
    (its rounds in order: `more_tokens` continue `next_token`), the same tokens as one a message."""
    one_each = streamed_tokens(run_stream(stub, [open_msg(fingerprint), generate(0, 20), close()]))
    assert all(len(m) == 1 for m in one_each)
    replies = run_stream(stub, [open_msg(fingerprint), generate(0, 20, per_message=8), close()])
    chunks = streamed_tokens(replies)
    assert flat(chunks) == flat(one_each)
    assert [len(c) for c in chunks] == [min(8, len(one_each) - i) for i in range(0, len(one_each), 8)], chunks
    rounds = [m.verdict.round for m in replies[1:]]
    assert rounds == list(range(0, len(one_each), 8))
    # After it the session goes on with drafts at the next round.
    more = run_stream(stub, [open_msg(fingerprint), generate(0, 3, per_message=8), draft(3, [5, 6])])
    assert [len(c) for c in streamed_tokens(more)] == [3, 1] and more[-1].verdict.round == 3
    # More than the edge's cap asked for: 256 a message (this prompt runs 300 tokens without eos).
    opened = open_msg(fingerprint, max_new_tokens=400)
    capped = streamed_tokens(run_stream(stub, [opened, generate(0, 300, per_message=1000), close()]))
    assert [len(c) for c in capped] == [256, 44]


def close() -> pb.DeviceMessage:
    return pb.DeviceMessage(close=pb.CloseSession())


def test_edge_only_generation_streams_until_eos_or_max(stub: pb_grpc.GelatoStub, fingerprint: str) -> None:
    """`ar-edge`: one Generate, one verdict per token, equal to the tokens of k = 0 rounds."""
    streamed = run_stream(stub, [open_msg(fingerprint), generate(0, 6), pb.DeviceMessage(close=pb.CloseSession())])
    tokens = [m.verdict.next_token for m in streamed[1:]]
    assert 1 <= len(tokens) <= 6 and all(m.verdict.n_accepted == 0 for m in streamed[1:])
    assert [m.verdict.round for m in streamed[1:]] == list(range(len(tokens)))
    stepwise = run_stream(stub, [open_msg(fingerprint)] + [draft(r, []) for r in range(len(tokens))])
    assert [m.verdict.next_token for m in stepwise[1:]] == tokens
    # After a streamed run the session goes on with drafts at the next round.
    more = run_stream(stub, [open_msg(fingerprint), generate(0, 2), draft(2, [5, 6])])
    assert len(more) == 4 and more[-1].verdict.round == 2


def test_edge_only_generation_errors(stub: pb_grpc.GelatoStub, fingerprint: str) -> None:
    details = expect_status(stub, [generate(0, 4)], grpc.StatusCode.FAILED_PRECONDITION)
    assert "generate before open" in details
    details = expect_status(stub, [open_msg(fingerprint), generate(3, 4)], grpc.StatusCode.FAILED_PRECONDITION)
    assert "at round 0" in details
    details = expect_status(stub, [open_msg(fingerprint), generate(0, 0)], grpc.StatusCode.INVALID_ARGUMENT)
    assert "max_tokens must be >= 1" in details


def test_edge_only_generation_past_the_reservation_is_out_of_range(stub: pb_grpc.GelatoStub, fingerprint: str) -> None:
    """A Generate asking for more tokens than the session was opened for streams up to the
    reservation, then ends OUT_OF_RANGE, as a draft block there would (it stopped silently and
    left the device waiting until the idle timeout)."""
    opened = open_msg(fingerprint, max_new_tokens=1)
    ends = []
    for per_message in (1, 8):  # a run of steps ends at the reservation as single steps do
        replies: list[pb.EdgeMessage] = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in stub.Session(iter([opened, generate(0, 1000, per_message)]), timeout=30):
                replies.append(reply)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, info.value.details()
        assert "reserved at open" in (info.value.details() or "")
        ends.append(flat(streamed_tokens(replies)))
        assert len(ends[-1]) > 1  # the reservation's tokens came first (prefix + 1 + one block)
    assert ends[0] == ends[1]
    assert stub.Info(pb.InfoRequest(), timeout=10).active_sessions == 0


def test_edge_only_generation_with_the_context_full_is_out_of_range(stub: pb_grpc.GelatoStub, fingerprint: str) -> None:
    """A Generate when the context is already full gets OUT_OF_RANGE at once (it got nothing and
    left its client waiting until the idle timeout); one that fills it streams what fits."""
    opened = open_msg(fingerprint, prefix=[1] * 511, max_new_tokens=1)
    details = expect_status(stub, [opened, draft(0, []), generate(1, 5)], grpc.StatusCode.OUT_OF_RANGE)
    assert "context limit (512 tokens) is full" in details
    for per_message in (1, 8):
        streamed = run_stream(stub, [opened, generate(0, 5, per_message), close()])
        assert [m.verdict.round for m in streamed[1:]] == [0]  # the one token that fits
        assert not streamed[1].verdict.more_tokens
    assert stub.Info(pb.InfoRequest(), timeout=10).active_sessions == 0


async def _silent_streams(address: str, fp: str, n: int, wait_s: float) -> dict[str, object]:
    """Start `n` Session streams that send nothing, then streams with an open until one is
    refused (the edge then holds all `n`); then wait for the silent ones' statuses."""
    import asyncio
    import time

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GelatoStub(channel)
        started = time.monotonic()
        silent = [stub.Session() for _ in range(n)]
        await asyncio.gather(*(call.wait_for_connection() for call in silent))
        refused: grpc.aio.AioRpcError | None = None
        while refused is None and time.monotonic() - started < wait_s:
            extra = stub.Session()
            await extra.write(open_msg(fp))
            try:
                assert (await extra.read()).WhichOneof("kind") == "opened"  # not all held yet: close it
                await extra.write(pb.DeviceMessage(close=pb.CloseSession()))
                await extra.done_writing()
                await extra.code()
            except grpc.aio.AioRpcError as exc:
                refused = exc
        ends = await asyncio.gather(*(call.code() for call in silent))
        details = {await call.details() for call in silent}
        return {
            "refused": (refused.code(), refused.details()) if refused else None,
            "codes": set(ends),
            "details": details,
            "ended_after_s": time.monotonic() - started,
        }


def test_streams_that_send_no_open_are_bounded_and_ended(pair: dict[str, Path], fingerprint: str) -> None:
    """A client that starts Session streams and sends nothing (a device sends its open at once):
    at most max(64, --max-sessions) such streams wait at once, the next is refused
    RESOURCE_EXHAUSTED at its start, and each ends DEADLINE_EXCEEDED after --open-timeout-s (not
    the 300 s idle timeout); then devices are served as before. Without the bound and the
    timeout, a client looping over streams held thousands of them, with their tasks and gRPC state."""
    import asyncio

    open_timeout_s = 8.0
    metrics_port = free_port()
    args = ["--max-sessions", "1", "--open-timeout-s", "8", "--metrics-port", str(metrics_port)]
    edge = EdgeProcess(["--target", str(pair["target"]), *args])
    try:
        result = asyncio.run(_silent_streams(edge.address, fingerprint, 64, open_timeout_s - 2))
        assert rejected(metrics_port)["waiting_streams"] >= 1
        with grpc.insecure_channel(edge.address) as channel:
            out = run_stream(pb_grpc.GelatoStub(channel), [open_msg(fingerprint), draft(0, [1, 2])])
        assert out[1].verdict.round == 0
    finally:
        assert edge.stop() == 0
    assert result["refused"] is not None, result
    code, details = result["refused"]  # type: ignore[misc]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "64 Session streams are waiting to open" in details, details
    assert result["codes"] == {grpc.StatusCode.DEADLINE_EXCEEDED}, result
    assert result["details"] == {f"no open within {open_timeout_s:g} s of the stream's start"}, result
    assert open_timeout_s - 1 <= result["ended_after_s"] <= open_timeout_s + 10, result  # type: ignore[operator]


def test_bad_utf8_is_invalid_argument_with_the_pure_python_protobuf_too() -> None:
    """protobuf's pure-Python implementation (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, or a
    platform without its compiled wheels) raises UnicodeDecodeError, not DecodeError, for a string
    field with bad UTF-8: that was INTERNAL, a client's mistake answered as the edge's fault."""
    code = (
        "from gelato.edge.statuses import parse_request\n"
        "from gelato.edge.sessions import StatusError\n"
        "from gelato.v1 import gelato_pb2 as pb\n"
        "from google.protobuf.internal import api_implementation\n"
        "assert api_implementation.Type() == 'python', api_implementation.Type()\n"
        "try:\n"
        "    parse_request(pb.DeviceMessage, b'\\x0a\\x05\\x12\\x03\\xff\\xfe\\xfd')\n"
        "except StatusError as exc:\n"
        "    print(exc.code.name, exc.details)\n"
    )
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("INVALID_ARGUMENT malformed DeviceMessage"), res.stdout


def test_a_message_kind_this_edge_does_not_know_is_named_so(edge: EdgeProcess, stub: pb_grpc.GelatoStub) -> None:
    """A newer device's message kind (field 5 of the oneof, unknown here) parses with no kind set:
    refused INVALID_ARGUMENT as before, but no longer described as an empty message."""
    fp = stub.Info(pb.InfoRequest(), timeout=10).tokenizer_fingerprint
    unknown_kind = b"\x2a\x00"  # field 5, length-delimited, empty
    err = raw_session(edge, [open_msg(fp).SerializeToString(), unknown_kind])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a kind this edge does not know" in (err.details() or ""), err.details()
    err = raw_session(edge, [open_msg(fp).SerializeToString(), b""])  # truly empty: said so
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty DeviceMessage (no open/draft/generate/close)" in (err.details() or ""), err.details()
