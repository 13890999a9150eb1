"""Shared by the send-ahead tests (test_send_ahead*.py): the prompt, greedy sampling, a scripted policy
mixing empty and drafted blocks, and `run`, one generation against an in-process target session."""

from __future__ import annotations

import asyncio

from gelato.controller import Decision
from gelato.device.drafter import Drafter
from gelato.device.generate import GenerationResult, Limits, local_verifier, speculative_generate
from gelato.device.local_link import local_link
from gelato.device.pipeline import pipelined_generate
from gelato.device.policy import FixedK, PolicyOptions, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, encode_prompt
from gelato.types import SamplingParams

GREEDY = SamplingParams()
PROMPT = "Ava has 12 apples and Ben gives her 3 more. How many?"


class Scripted(FixedK):
    """Block sizes from a fixed pattern keyed by the room left (a function of the state, as a
    policy's decision is): stretches of K = 0 (empty blocks sent ahead) next to drafted blocks, so
    a chain passes between the two kinds every way."""

    PATTERN = (0, 0, 3, 0, 2, 2, 0, 0, 0, 4, 1, 0, 0)

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(0, options)

    def decide(self, limit: int) -> Decision:
        k = min(self.PATTERN[limit % len(self.PATTERN)], limit)
        return Decision(k, k, self.controller.q_j)


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
    options = PolicyOptions(pipeline=pipeline, k_max=6, ahead_blocks=ahead)
    policy = Scripted(options) if name == "scripted" else parse_policy(name, options)
    d = Drafter(drafter, params, top_m=8)
    if pipeline == "send-ahead":
        # The verdict comes 20 ms after its block: long enough for the chain to be drafted ahead.
        coro = pipelined_generate(d, local_link(session, max_ahead=4, delay_s=0.02), policy, prompt, limits)
    else:
        coro = speculative_generate(d, local_verifier(session), policy, prompt, limits)
    return asyncio.run(coro), session
