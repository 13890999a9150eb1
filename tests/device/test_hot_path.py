"""The device's per-round hot path does less work, with the same results bit for bit.

`KVSequence.forward_last` (the last position's logits, the previous argmax fed as is, one
inference-mode scope per block) equals `forward(...)[-1]` exactly, whatever number of tokens is
fed; a drafted block equals one drafted the plain way (`forward` per token, then argmax and entropy
of the last row); and the round loop leaves the event loop's thread only to run the drafter model:
one offload per drafting round, none for an empty block or for applying a verdict.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.device.generate import Limits, local_verifier, speculative_generate
from gelato.device.local_link import local_link
from gelato.device.pipeline import pipelined_generate
from gelato.device.policy import FixedK, PolicyOptions, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.entropy import entropy_nats, entropy_of_probs
from gelato.kv import KVSequence
from gelato.models import LoadedModel, encode_prompt
from gelato.sampling import process_logits, truncate_top_m
from gelato.types import SamplingParams, Verdict

PROMPT = "Ava has 12 apples and Ben gives her 3 more. How many?"


def _seq(loaded: LoadedModel, tokens: list[int], uncached: int) -> KVSequence:
    seq = KVSequence(loaded.model, loaded.vocab_size, tokens)
    seq.prefill(len(tokens) - uncached)
    return seq


@pytest.mark.parametrize("uncached", [1, 2, 3])
def test_forward_last_is_forward_last_row(drafter_model: LoadedModel, uncached: int) -> None:
    tokens = encode_prompt(drafter_model.tokenizer, PROMPT)
    plain, fast = _seq(drafter_model, tokens, uncached), _seq(drafter_model, tokens, uncached)
    want = plain.forward()[-1]
    got = fast.forward_last()
    assert got.shape == (drafter_model.vocab_size,) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert fast.cached == plain.cached == len(tokens)
    # One more token, fed as the argmax tensor the drafter keeps (and without it), in and out of
    # an inference-mode scope: the same row, the same cache.
    nxt = want.argmax()
    want2 = plain.forward([int(nxt)])[-1]
    with torch.inference_mode():
        got2 = fast.forward_last((int(nxt),), nxt.view(1, 1))
    assert torch.equal(got2, want2)
    third = int(want2.argmax())
    assert torch.equal(fast.forward_last((third,)), plain.forward([third])[-1])
    assert fast.tokens == plain.tokens and fast.cached == plain.cached
    with pytest.raises(ValueError):
        fast.forward_last()


def _draft_plainly(seq: KVSequence, k: int) -> tuple[list[int], list[float]]:
    """A greedy block the straightforward way: one `forward` per token, argmax and entropy of the
    last row; the last draft is not fed (as the drafter does)."""
    ids: list[int] = []
    entropies: list[float] = []
    while len(ids) < k:
        logits = seq.forward([ids[-1]] if ids else [])[-1]
        ids.append(int(logits.argmax()))
        entropies.append(entropy_nats(logits))
    return ids, entropies


def test_drafted_block_equals_plain_drafting(drafter_model: LoadedModel) -> None:
    tokens = encode_prompt(drafter_model.tokenizer, PROMPT)
    drafter = Drafter(drafter_model, SamplingParams())
    drafter.start(tokens)
    plain = _seq(drafter_model, tokens, 1)
    block = drafter.draft(6, 0)
    ids, entropies = _draft_plainly(plain, 6)
    assert list(block.ids) == ids and list(block.entropies) == entropies  # bit for bit
    # After a full accept the next block first feeds two tokens ([d_k, bonus]): every row is
    # computed then, as `forward` does, so the block is again the plain one.
    bonus = ids[-1]
    drafter.apply(block, Verdict(round=0, n_accepted=block.k, next_token=bonus))
    plain.set_tail(len(tokens), [*ids, bonus])
    nxt = drafter.draft(3, 1)
    ids2, entropies2 = _draft_plainly(plain, 3)
    assert list(nxt.ids) == ids2 and list(nxt.entropies) == entropies2
    assert drafter.seq.tokens == plain.tokens and drafter.seq.cached == plain.cached


def test_a_sampled_block_carries_the_q_it_drew_from_and_that_qs_entropy(drafter_model: LoadedModel) -> None:
    """Sampling: each draft's q is the top-m of the processed row the plain way (temperature, top-k,
    truncation), the draft is in its support, and the entropy the early exit reads is that q's, the
    distribution actually sampled from (not the raw logits')."""
    tokens = encode_prompt(drafter_model.tokenizer, PROMPT)
    params = SamplingParams(temperature=1.5, top_k=50, seed=7)
    drafter = Drafter(drafter_model, params, top_m=8)
    drafter.start(tokens)
    block = drafter.draft(6, 0)
    assert len(block.q) == block.k == 6
    plain = _seq(drafter_model, tokens, 1)
    for i, (x, q, h) in enumerate(zip(block.ids, block.q, block.entropies, strict=True)):
        logits = plain.forward([block.ids[i - 1]] if i else [])[-1]
        want = truncate_top_m(process_logits(logits, params), 8)
        assert q == want and x in q.ids
        assert h == entropy_of_probs(torch.tensor(want.probs))
        assert abs(h - entropy_nats(logits)) > 1e-3  # the raw row's entropy differs: the test tells them apart


def _counting(calls: list[str]) -> Any:
    async def offload(fn: Any, *args: Any) -> Any:
        calls.append(fn.__name__)
        return fn(*args)

    return offload


@pytest.mark.parametrize("k", [0, 4])
def test_one_offload_per_drafting_round(drafter_model: LoadedModel, target: LoadedModel, k: int) -> None:
    prompt = encode_prompt(target.tokenizer, PROMPT)
    params = SamplingParams()
    session = TargetSession("s", target, params, prompt)
    session.prefill()
    calls: list[str] = []
    limits = Limits(40, target.context_limit, 32, target.eos_token_ids)
    drafter = Drafter(drafter_model, params)
    res = asyncio.run(
        speculative_generate(drafter, local_verifier(session), FixedK(k), prompt, limits, offload=_counting(calls))
    )
    drafting = sum(1 for t in res.stats.rounds_log if t.k > t.carried)
    assert calls == ["start"] * (k > 0) + ["draft"] * drafting  # fixed-0 prefills nothing: no hop at all
    assert (drafting == 0) == (k == 0)
    # The same tokens as the target decoding alone (every round inline: the default offload).
    alone = TargetSession("t", target, params, prompt)
    alone.prefill()
    plain = Drafter(drafter_model, params)
    ref = asyncio.run(speculative_generate(plain, local_verifier(alone), FixedK(0), prompt, limits))
    assert res.token_ids == ref.token_ids


def test_offloaded_drafter_work_stays_off_the_pipelined_loops(drafter_model: LoadedModel, target: LoadedModel) -> None:
    """With a real drafter thread, pre-drafting and send-ahead still give the unpipelined tokens,
    and only model work (start, draft, pre-draft, draft-after) goes to that thread."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    params = SamplingParams()
    limits = Limits(40, target.context_limit, 32, target.eos_token_ids)
    names: list[str] = []

    async def run(pipeline: str) -> list[int]:
        session = TargetSession("s", target, params, prompt)
        session.prefill()
        with ThreadPoolExecutor(1) as pool:

            async def offload(fn: Any, *args: Any) -> Any:
                names.append(fn.__name__)
                return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

            policy = parse_policy("fixed-4", PolicyOptions(pipeline=pipeline))
            drafter = Drafter(drafter_model, params)
            if pipeline == "send-ahead":
                link = local_link(session, max_ahead=2, delay_s=0.005)
                res = await pipelined_generate(drafter, link, policy, prompt, limits, offload=offload)
            else:
                verify = local_verifier(session)
                res = await speculative_generate(drafter, verify, policy, prompt, limits, offload=offload)
        return res.token_ids

    plain = asyncio.run(run("off"))
    assert asyncio.run(run("local")) == plain
    assert asyncio.run(run("send-ahead")) == plain
    assert "predraft" in names and set(names) <= {"start", "draft", "predraft", "draft_after"}, set(names)


@pytest.mark.parametrize(
    ("name", "pipeline", "empty_ahead", "forwards"),
    [
        ("fixed-0", "off", True, False),
        ("ar-edge", "off", True, False),
        ("fixed-0", "local", True, False),
        ("fixed-0", "send-ahead", True, False),
        ("fixed-0", "send-ahead", False, True),  # an edge without empty blocks ahead: guesses are drafted
        ("fixed-4", "off", True, True),
    ],
)
def test_a_policy_that_never_drafts_runs_no_drafter_forward(
    drafter_model: LoadedModel, target: LoadedModel, name: str, pipeline: str, empty_ahead: bool, forwards: bool
) -> None:
    """`fixed-0` and `ar-edge` never draft: the drafter does not prefill the prompt either (it cost
    the device time and energy for nothing, and delayed the first round), and the tokens are the
    target's as ever."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    params = SamplingParams()
    limits = Limits(30, target.context_limit, 32, target.eos_token_ids)
    fed: list[int] = []
    hook = drafter_model.model.register_forward_pre_hook(lambda _m, args, kw: fed.append(1), with_kwargs=True)
    try:
        session = TargetSession("s", target, params, prompt)
        session.prefill()
        policy = parse_policy(name, PolicyOptions(pipeline=pipeline))
        drafter = Drafter(drafter_model, params)
        if pipeline == "send-ahead":
            link = local_link(session, max_ahead=2, empty_ahead=empty_ahead)
            res = asyncio.run(pipelined_generate(drafter, link, policy, prompt, limits))
        else:
            res = asyncio.run(speculative_generate(drafter, local_verifier(session), policy, prompt, limits))
    finally:
        hook.remove()
    assert bool(fed) == forwards, len(fed)
    alone = TargetSession("t", target, params, prompt)
    alone.prefill()
    ref = asyncio.run(
        speculative_generate(Drafter(drafter_model, params), local_verifier(alone), FixedK(0), prompt, limits)
    )
    assert res.token_ids == ref.token_ids and res.stats.stop_reason == ref.stats.stop_reason
