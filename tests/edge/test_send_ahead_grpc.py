"""Send-ahead through real gRPC and a real edge process: concurrent sessions pipelining blocks
(hits and stale answers) give exactly the unpipelined outputs, leave no session or KV behind, and
an edge without send-ahead (`--max-ahead-rounds 0`) still serves a device that asks for it; a
send-ahead block such an edge cannot take, and malformed ones, get precise statuses."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import pytest

from gelato.device.client import CLOSE_WAIT_S, EdgeClient
from gelato.device.drafter import Drafter
from gelato.device.generate import GenerationResult
from gelato.device.policy import PolicyOptions, parse_policy
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.types import SamplingParams
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.conftest import EdgeProcess, target_greedy
from tests.edge.test_batched_grpc import free_port, open_msg, scrape_when_idle


async def generate_all(
    address: str, drafters: list[LoadedModel], prompts: list[str], params: list[SamplingParams], pipeline: str
) -> list[GenerationResult]:
    async def one(loaded: LoadedModel, text: str, p: SamplingParams) -> GenerationResult:
        client = EdgeClient(address)
        try:
            policy = parse_policy("fixed-3", PolicyOptions(pipeline=pipeline, ahead_blocks=3))
            return await client.generate(Drafter(loaded, p), encode_prompt(loaded.tokenizer, text), 24, policy)
        finally:
            await client.close()

    runs = (one(d, t, p) for d, t, p in zip(drafters, prompts, params, strict=True))
    return list(await asyncio.gather(*runs))


def test_send_ahead_sessions_match_unpipelined_and_leave_nothing(
    pair: dict[str, Path], drafter_model: LoadedModel, prompts: list[str]
) -> None:
    never = load_model(str(pair["drafter_never"]), "drafter", "float32", "cpu")
    metrics_port = free_port()
    edge = EdgeProcess(["--target", str(pair["target"]), "--metrics-port", str(metrics_port)])
    try:
        n = 6
        drafters = [drafter_model, drafter_model, never] * 2
        params = [SamplingParams(temperature=0.8 if i % 2 else 0.0, top_k=20, seed=i) for i in range(n)]
        piped = asyncio.run(generate_all(edge.address, drafters, prompts[:n], params, "send-ahead"))
        m = scrape_when_idle(metrics_port)
        plain = asyncio.run(generate_all(edge.address, drafters, prompts[:n], params, "off"))
        assert [r.token_ids for r in piped] == [r.token_ids for r in plain]
        assert all(r.stats.stop_reason in ("eos", "max_new_tokens") for r in piped)
        ahead = sum(t.sent_ahead for r in piped for t in r.stats.rounds_log)
        stale = sum(t.stale_blocks for r in piped for t in r.stats.rounds_log)
        # Blocks drafted while their parent was in flight, sent with a guess (or empty) whether
        # before that parent's verdict (`sent_ahead`) or once it was in as a hit: on this loopback,
        # six sessions drafting on one device thread, the verdicts are in first, nearly always.
        chained = sum(t.guessed or t.follow for r in piped for t in r.stats.rounds_log)
        assert chained > 0 and ahead <= chained
        # The edge answered at least what the devices used: every block a device verified ahead was
        # a hit there, every block it cut was answered stale (blocks still in flight when a
        # generation ended were answered too, unread).
        assert m['gelato_edge_ahead_blocks_total{outcome="hit"}'] >= chained >= ahead
        assert m['gelato_edge_ahead_blocks_total{outcome="stale"}'] >= stale
        # Whether a guessed block of the never-agreeing drafter goes out before its parent's verdict
        # is back (to be answered stale) is a race here: the device drops a block the verdict
        # already refutes. Stale answers are made on purpose in test_stale_hit_and_duplicate_over_the_wire
        # and test_empty_blocks_ahead_over_the_wire.
        assert m["gelato_edge_sessions_active"] == 0
        assert m["gelato_edge_kv_bytes"] == 0 == m["gelato_edge_kv_pool_bytes"]
    finally:
        assert edge.stop() == 0


def test_edge_without_send_ahead(pair: dict[str, Path], drafter_model: LoadedModel, prompts: list[str]) -> None:
    edge = EdgeProcess(["--target", str(pair["target"]), "--max-ahead-rounds", "0"])
    try:
        params = [SamplingParams()] * 2
        piped = asyncio.run(generate_all(edge.address, [drafter_model] * 2, prompts[:2], params, "send-ahead"))
        plain = asyncio.run(generate_all(edge.address, [drafter_model] * 2, prompts[:2], params, "off"))
        assert [r.token_ids for r in piped] == [r.token_ids for r in plain]
        assert not any(t.sent_ahead for r in piped for t in r.stats.rounds_log)
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GelatoStub(channel)
            assert stub.Info(pb.InfoRequest(), timeout=10).max_ahead_rounds == 0
            ahead = pb.DraftBlock(round=1, ids=[4, 5], parent_round=0)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Session(iter([open_msg(drafter_model.fingerprint, 5, 20), pb.DeviceMessage(draft=ahead)])))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "send-ahead is off" in (info.value.details() or "")
    finally:
        assert edge.stop() == 0


@pytest.mark.parametrize(
    ("block", "code", "words"),
    [
        (pb.DraftBlock(round=1, ids=[4], parent_round=3), grpc.StatusCode.INVALID_ARGUMENT, "parent_round 3"),
        (
            pb.DraftBlock(round=1, ids=[], q=[pb.SparseDist(ids=[4])], parent_round=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no ids, so no q",
        ),
        (pb.DraftBlock(round=0, ids=[4], parent_round=0), grpc.StatusCode.INVALID_ARGUMENT, "parent_round 0"),
        (pb.DraftBlock(round=9, ids=[4], parent_round=8), grpc.StatusCode.OUT_OF_RANGE, "allows 4"),
    ],
)
def test_bad_send_ahead_blocks(
    edge: EdgeProcess, drafter_model: LoadedModel, block: pb.DraftBlock, code: grpc.StatusCode, words: str
) -> None:
    with grpc.insecure_channel(edge.address) as channel:
        stub = pb_grpc.GelatoStub(channel)
        msgs = [open_msg(drafter_model.fingerprint, 5, 20), pb.DeviceMessage(draft=block)]
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Session(iter(msgs), timeout=30))
        assert info.value.code() == code, info.value.details()
        assert words in (info.value.details() or "")


def test_stale_hit_and_duplicate_over_the_wire(edge: EdgeProcess, drafter_model: LoadedModel) -> None:
    """A stale block is answered at once and changes nothing (the same round then hits with the
    right guess); sending that round ahead again after it was verified is a duplicate."""
    with grpc.insecure_channel(edge.address) as channel:
        stub = pb_grpc.GelatoStub(channel)
        vocab = stub.Info(pb.InfoRequest(), timeout=10).vocab_size
        opening = [open_msg(drafter_model.fingerprint, 5, 20), pb.DeviceMessage(draft=pb.DraftBlock(round=0))]
        token = list(stub.Session(iter(opening), timeout=30))[1].verdict.next_token  # greedy: the same every time

        def ahead(guess: int) -> pb.DeviceMessage:
            return pb.DeviceMessage(draft=pb.DraftBlock(round=1, ids=[guess, 7], parent_round=0))

        call = stub.Session(iter([*opening, ahead((token + 1) % vocab), ahead(token), ahead(token)]), timeout=30)
        replies = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in call:
                replies.append(reply.verdict)
        assert [v.round for v in replies[1:]] == [0, 1, 1]
        assert replies[1].next_token == token and not replies[1].stale
        assert replies[2].stale and replies[2].batch_rows == 0  # answered without a forward
        assert not replies[3].stale and replies[3].batch_rows >= 1  # the hit: [7] verified after the guess
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already verified" in (info.value.details() or "")


def test_empty_blocks_ahead_over_the_wire(edge: EdgeProcess, drafter_model: LoadedModel) -> None:
    """Empty send-ahead blocks, all written before any verdict is read: each one is the target's next
    token after whatever came before (here a block of drafts the target rejects), the same tokens
    as rounds one at a time; one whose parent was stale is stale; the edge says it takes them."""
    with grpc.insecure_channel(edge.address) as channel:
        stub = pb_grpc.GelatoStub(channel)
        vocab = stub.Info(pb.InfoRequest(), timeout=10).vocab_size
        opening = open_msg(drafter_model.fingerprint, 5, 20)

        def tokens(blocks: list[pb.DraftBlock]) -> list[pb.EdgeMessage]:
            msgs = [opening, *(pb.DeviceMessage(draft=b) for b in blocks), pb.DeviceMessage(close=pb.CloseSession())]
            return list(stub.Session(iter(msgs), timeout=30))

        plain = tokens([pb.DraftBlock(round=r) for r in range(4)])
        assert plain[0].opened.empty_ahead
        want = [m.verdict.next_token for m in plain[1:]]
        wrong = (want[0] + 1) % vocab  # a draft the target rejects: round 0 emits want[0] all the same
        piped = tokens(
            [pb.DraftBlock(round=0, ids=[wrong]), *(pb.DraftBlock(round=r, parent_round=r - 1) for r in (1, 2, 3))]
        )
        got = [m.verdict for m in piped[1:]]
        assert [v.n_accepted for v in got] == [0, 0, 0, 0] and not any(v.stale for v in got)
        assert [v.next_token for v in got] == want
        # Round 1 sent ahead with a wrong guess is stale, so the empty block after it is stale too.
        miss = pb.DraftBlock(round=1, ids=[(want[0] + 1) % vocab], parent_round=0)
        cut = tokens([pb.DraftBlock(round=0), miss, pb.DraftBlock(round=2, parent_round=1)])
        assert [(m.verdict.round, m.verdict.stale) for m in cut[1:]] == [(0, False), (1, True), (2, True)]


def test_a_send_ahead_block_that_fails_is_not_a_hit(pair: dict[str, Path], drafter_model: LoadedModel) -> None:
    """`gelato_edge_ahead_blocks_total{outcome="hit"}` counts the send-ahead blocks verified: empty
    blocks ahead go on until one passes the session's reservation (OUT_OF_RANGE after it resolved
    against its parent), which is not counted."""
    port = free_port()
    edge = EdgeProcess(["--target", str(pair["target"]), "--metrics-port", str(port), "--max-draft-tokens", "2"])
    try:
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GelatoStub(channel)
            blocks = [pb.DraftBlock(round=0), *(pb.DraftBlock(round=r, parent_round=r - 1) for r in range(1, 12))]
            msgs = [open_msg(drafter_model.fingerprint, 5, 1), *(pb.DeviceMessage(draft=b) for b in blocks)]
            replies = []
            with pytest.raises(grpc.RpcError) as info:
                for reply in stub.Session(iter(msgs), timeout=30):
                    replies.append(reply)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and "reserved" in (info.value.details() or "")
        verified_ahead = len(replies) - 2  # past the opened message and round 0's verdict
        assert verified_ahead >= 1 and not any(r.verdict.stale for r in replies[1:])
        m = scrape_when_idle(port)
        assert m['gelato_edge_ahead_blocks_total{outcome="hit"}'] == verified_ahead
        assert m['gelato_edge_ahead_blocks_total{outcome="stale"}'] == 0
    finally:
        edge.stop()


def test_blocks_in_flight_at_an_eos_are_read_after_the_close(pair: dict[str, Path], tmp_path: Path) -> None:
    """`fixed-0` with send-ahead ends at an eos with empty blocks still in flight. Their verdicts are
    read after the close (their bytes charged, as their blocks' are), so the edge's status comes
    back at once. gRPC gives a stream's status only once every message is read: the device waited
    out `CLOSE_WAIT_S` (1 s more per generation, in its elapsed time), and their bytes were lost."""
    target_dir = tmp_path / "target"
    shutil.copytree(pair["target"], target_dir)
    target = load_model(str(target_dir), "target", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples.")
    stop = target_greedy(target, prompt, 12)[6]  # the 7th token the target emits, made an end token
    config = json.loads((target_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], stop]
    (target_dir / "generation_config.json").write_text(json.dumps(config))
    edge = EdgeProcess(["--target", str(target_dir), "--log-level", "info", "--log-format", "json"])

    async def one(pipeline: str) -> GenerationResult:
        client = EdgeClient(edge.address)
        try:
            policy = parse_policy("fixed-0", PolicyOptions(pipeline=pipeline, ahead_blocks=3))
            return await client.generate(Drafter(target, SamplingParams()), prompt, 20, policy)
        finally:
            await client.close()

    try:
        piped, plain = asyncio.run(one("send-ahead")), asyncio.run(one("off"))
    finally:
        assert edge.stop() == 0
    assert piped.token_ids == plain.token_ids and piped.stats.stop_reason == "eos"
    assert piped.elapsed_s < CLOSE_WAIT_S  # 20 tokens of the tiny pair: a few ms
    records = [json.loads(line) for line in edge.output().splitlines() if line.startswith("{")]
    assert [r["outcome"] for r in records if r.get("event") == "session_end"] == ["OK", "OK"], records

    def outside_rounds(r: GenerationResult) -> int:  # the opened message, and what came after the close
        return r.stats.bytes_down - sum(t.bytes_down for t in r.stats.rounds_log)

    assert outside_rounds(piped) > outside_rounds(plain)  # the verdicts of the blocks sent past the eos
