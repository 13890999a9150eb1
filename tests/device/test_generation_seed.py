"""The seed a device sends the edge: one per generation, from the user's seed and the prompt.

The edge keys its acceptance and emit draws by token position alone. Sent the user's seed as such,
every prompt of a run drew the same uniforms at each position, and a policy that carries what one
prompt's verdicts showed into the next decided where to draft by draws it had seen, which
speculative sampling must not (a toy policy skewed the second prompt's first token from the
target's [0.5, 0.3, 0.1, 0.1] to [0.42, 0.27, 0.16, 0.16]). A failover's re-open carries the
prompt and the accepted tokens as its prefix: it must send the same seed, so that the generation
draws what an uninterrupted one would. The same prompt asked again in the run draws afresh (its
first generation keeps the seed above)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gelato.device.client import EdgeClient
from gelato.device.drafter import Drafter
from gelato.device.policy import parse_policy
from gelato.models import LoadedModel, encode_prompt
from gelato.sampling import generation_seed
from gelato.types import SamplingParams
from gelato.v1 import gelato_pb2 as pb
from tests.device.test_client_stream import _Stream


class _Recording(_Stream):
    """A stream that keeps the sampling each open asked the edge for."""

    def __init__(self, target: LoadedModel, opens: list[pb.SamplingParams], **kw: object) -> None:
        super().__init__(target, **kw)  # type: ignore[arg-type]
        self.opens = opens

    async def _take(self, msg: pb.DeviceMessage) -> None:
        if msg.WhichOneof("kind") == "open":
            self.opens.append(msg.open.sampling)
        await super()._take(msg)


async def generate_all(streams: Iterator[_Stream], drafter: Drafter, prompts: list[list[int]]) -> list[int]:
    """The prompts one after another through one client (one policy, `fixed-0`: no drafts, as the
    stub verifies greedily) whose sessions are `streams`; each generation's failovers."""
    client = EdgeClient("127.0.0.1:1", failovers=1, connect_timeout_s=5.0)

    async def connect(timeout_s: float | None = None) -> None:
        pass

    class Stub:
        def Session(self, **kwargs: object) -> _Stream:
            return next(streams)

        async def Info(self, request: pb.InfoRequest, **kwargs: object) -> pb.InfoResponse:
            # Asked before the last re-open (`--failovers 1`): the edge is there.
            return pb.InfoResponse(protocol_version=1, vocab_size=drafter.loaded.vocab_size, context_limit=512)

    client.connect = connect  # type: ignore[method-assign]
    client.stub = Stub()  # type: ignore[assignment]
    policy, failovers = parse_policy("fixed-0"), []
    try:
        for prompt in prompts:
            res = await client.generate(drafter, prompt, 8, policy)
            assert res.error == "" and len(res.token_ids) > 0, res.error
            failovers.append(res.failovers)
    finally:
        await client.close()
    return failovers


def test_generation_seed_is_a_uint64_of_the_seed_and_the_prompt() -> None:
    seeds = {generation_seed(s, p) for s in (0, 1, 2**64 - 1) for p in ([], [1], [1, 2], [2, 1], [1, 2, 3])}
    assert len(seeds) == 15 and all(0 <= s < 2**64 for s in seeds)
    assert generation_seed(7, [1, 2]) == generation_seed(7, (1, 2))  # a pure function of its values
    repeats = {generation_seed(7, [1, 2], r) for r in range(4)}
    assert len(repeats) == 4 and generation_seed(7, [1, 2], 0) == generation_seed(7, [1, 2])


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, seed=7), SamplingParams()])
def test_each_prompt_opens_with_its_own_seed_and_a_failover_with_the_same(
    target: LoadedModel, drafter_model: LoadedModel, params: SamplingParams
) -> None:
    """Two prompts in one run (one client, one policy): their opens carry different seeds, each
    `generation_seed(seed, prompt)`; the first's session cut after two verdicts re-opens with its
    seed again. Greedy has no draws: its seed goes as it is."""
    opens: list[pb.SamplingParams] = []
    prompts = [encode_prompt(target.tokenizer, text) for text in ("Ava has 3 apples.", "Ben reads 4 pages.")]
    streams = iter([_Recording(target, opens, cut_after=2), _Recording(target, opens), _Recording(target, opens)])

    assert asyncio.run(generate_all(streams, Drafter(drafter_model, params), prompts)) == [1, 0]
    seeds = [o.seed for o in opens]
    if params.greedy:
        assert seeds == [0, 0, 0]
        return
    first, second = (generation_seed(7, p) for p in prompts)
    assert seeds == [first, first, second] and first != second
    assert all(abs(o.temperature - 0.8) < 1e-6 for o in opens)  # the rest of the sampling as asked


def test_the_same_prompt_asked_again_draws_afresh(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """One client, one policy, the prompts A A B A: each generation of A opens with a seed of its
    own (`generation_seed(seed, A, repeat)`), else the second sample would be the first again and
    the policy would draft by draws it had seen; B's seed is what it is alone. A failover in the
    second A re-opens with that generation's seed."""
    opens: list[pb.SamplingParams] = []
    a, b = (encode_prompt(target.tokenizer, text) for text in ("Ava has 3 apples.", "Ben reads 4 pages."))
    cuts = [None, 2, None, None, None]  # the second generation's session is cut after two verdicts
    streams = iter([_Recording(target, opens, **({"cut_after": c} if c else {})) for c in cuts])

    drafter = Drafter(drafter_model, SamplingParams(temperature=0.8, seed=7))
    assert asyncio.run(generate_all(streams, drafter, [a, a, b, a])) == [0, 1, 0, 0]
    expected = [generation_seed(7, a), generation_seed(7, a, 1), generation_seed(7, a, 1)]
    expected += [generation_seed(7, b), generation_seed(7, a, 2)]
    assert [o.seed for o in opens] == expected and len(set(expected)) == 4


def test_a_repeated_prompt_drafts_afresh(drafter_model: LoadedModel) -> None:
    """The drafter keys its draws per generation too (`Drafter.begin_generation`): the edge's fresh
    seed alone left every repeat drafting the same tokens, which a well-matched target mostly
    accepts (the built-in pair: 18 of 30 repeats opened with the same three tokens). The first
    generation of a prompt drafts as a fresh drafter does (keyed by --seed, as always)."""
    params = SamplingParams(temperature=1.0, seed=7)
    prompt, other = [5, 6, 7, 8], [9, 10]

    def drafts(d: Drafter) -> tuple[int, ...]:
        d.start(prompt, prefill=True)
        return d.draft(6, 0).ids

    d = Drafter(drafter_model, params)
    assert [d.begin_generation(p) for p in (prompt, prompt, other, prompt)] == [0, 1, 0, 2]
    d = Drafter(drafter_model, params)
    seen = []
    for repeat in range(6):
        assert d.begin_generation(prompt) == repeat
        seen.append(drafts(d))
    fresh = Drafter(drafter_model, params)
    fresh.begin_generation(prompt)
    assert seen[0] == drafts(fresh) == drafts(Drafter(drafter_model, params))  # the first keeps --seed
    assert len(set(seen)) > 1, seen
