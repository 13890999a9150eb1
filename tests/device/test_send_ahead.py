"""Send-ahead speculation in process: the chain loop (`gelato.device.pipeline`) against a real target
session answering in order with a delay, as the edge's stream does. The output must be exactly
the unpipelined one (greedy and sampled with the same seed: draws are keyed by token position),
with forced hits (drafter = target), forced misses (a drafter that never agrees) and a mix; the
edge's rule (`TargetSession.resolve_ahead`) refuses duplicate and too-deep blocks precisely."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from gelato.device.drafter import Drafter
from gelato.device.generate import GenerationResult, Limits, local_verifier, speculative_generate
from gelato.device.pipeline import local_link, pipelined_generate
from gelato.device.policy import PolicyOptions, parse_policy
from gelato.edge.sessions import StatusError, TargetSession
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.types import DraftBlock, SamplingParams

GREEDY = SamplingParams()
PROMPT = "Ava has 12 apples and Ben gives her 3 more. How many?"


def run(
    target: LoadedModel,
    drafter: LoadedModel,
    name: str,
    pipeline: str,
    params: SamplingParams = GREEDY,
    max_new: int = 60,
    ahead: int = 2,
) -> tuple[GenerationResult, TargetSession]:
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, params, prompt)
    session.prefill()
    limits = Limits(max_new, target.context_limit, 32, target.eos_token_ids)
    policy = parse_policy(name, PolicyOptions(pipeline=pipeline, k_max=6, ahead_blocks=ahead))
    d = Drafter(drafter, params, top_m=8)
    if pipeline == "send-ahead":
        # The verdict comes 20 ms after its block: long enough for the chain to be drafted ahead.
        coro = pipelined_generate(d, local_link(session, max_ahead=4, delay_s=0.02), policy, prompt, limits)
    else:
        coro = speculative_generate(d, local_verifier(session), policy, prompt, limits)
    return asyncio.run(coro), session


@pytest.mark.parametrize("name", ["fixed-4", "gelato"])
@pytest.mark.parametrize("drafter_key", ["target", "drafter_never", "drafter_agree"])
def test_send_ahead_greedy_is_exact(pair: dict[str, Path], target: LoadedModel, name: str, drafter_key: str) -> None:
    dm = target if drafter_key == "target" else load_model(str(pair[drafter_key]), "drafter", "float32", "cpu")
    plain, _ = run(target, dm, name, "off")
    piped, _ = run(target, dm, name, "send-ahead")
    assert piped.token_ids == plain.token_ids
    assert piped.stats.stop_reason == plain.stats.stop_reason
    log = piped.stats.rounds_log
    ahead = [t for t in log if t.sent_ahead]
    assert sum(t.emitted for t in log) == len(piped.token_ids)
    if drafter_key == "target":  # forced hits: the chain goes on, most rounds were sent ahead
        assert len(ahead) >= len(log) // 2, [(t.k, t.sent_ahead) for t in log]
        assert sum(t.stale_blocks for t in log) == 0
    if drafter_key == "drafter_never" and name == "fixed-4":  # forced misses: every block ahead is cut
        assert not ahead
        assert sum(t.stale_blocks for t in log) > 0
        assert sum(t.wasted_tokens for t in log) >= 2 * sum(t.stale_blocks for t in log)  # guess + drafts
        assert all(t.wasted_j >= 0 for t in log)


@pytest.mark.parametrize("drafter_key", ["target", "drafter_agree"])
def test_send_ahead_sampling_draws_what_rounds_one_at_a_time_draw(
    pair: dict[str, Path], target: LoadedModel, drafter_key: str
) -> None:
    """Same seed, same tokens: the drafter's and the target's draws are keyed by position, so the
    chain drafts (and the edge accepts) exactly what unpipelined rounds would."""
    dm = target if drafter_key == "target" else load_model(str(pair[drafter_key]), "drafter", "float32", "cpu")
    hits = 0
    for seed in range(6):
        params = SamplingParams(temperature=1.0, top_k=5, seed=seed)
        plain, _ = run(target, dm, "fixed-3", "off", params, max_new=30)
        piped, _ = run(target, dm, "fixed-3", "send-ahead", params, max_new=30)
        assert piped.token_ids == plain.token_ids, seed
        hits += sum(t.sent_ahead for t in piped.stats.rounds_log)
    assert hits > 0


def test_resolve_ahead_rules(target: LoadedModel) -> None:
    prompt = encode_prompt(target.tokenizer, PROMPT)
    s = TargetSession("s", target, SamplingParams(), prompt)
    s.prefill()
    first = DraftBlock(round=0, ids=())
    a, nxt = s.verify(first)  # an empty block is fully accepted: its token is the bonus
    assert (a, s.rounds, s.last_bonus) == (0, 1, nxt)
    hit = s.resolve_ahead(DraftBlock(round=1, ids=(5, 6), guess=nxt), 4)
    assert hit == DraftBlock(round=1, ids=(5, 6))
    assert s.resolve_ahead(DraftBlock(round=1, ids=(5,), guess=(nxt + 1) % target.vocab_size), 4) is None
    assert s.resolve_ahead(DraftBlock(round=3, ids=(5,), guess=nxt), 4) is None  # its parent was never verified
    with pytest.raises(StatusError) as dup:
        s.resolve_ahead(DraftBlock(round=0, ids=(5,), guess=nxt), 4)
    assert dup.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(StatusError) as deep:
        s.resolve_ahead(DraftBlock(round=5, ids=(5,), guess=nxt), 4)
    assert deep.value.code == grpc.StatusCode.OUT_OF_RANGE
    length = s.length
    s.verify(DraftBlock(round=1, ids=(target.eos_token_ids[0] + 1 if target.eos_token_ids else 3,)))
    assert s.length > length
    s.close()
