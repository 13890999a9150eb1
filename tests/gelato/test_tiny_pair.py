"""The shipped embedded-default pair: loads through the real path, greedy is deterministic and
lossless, the tokenizer round-trips and both models share it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.device.generate import Limits, local_verifier, speculative_generate
from gelato.device.policy import FixedK
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, default_model_path, encode_prompt, load_model
from gelato.types import SamplingParams


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return load_model(None, "target", "float32", "cpu")


@pytest.fixture(scope="module")
def drafter() -> LoadedModel:
    return load_model(None, "drafter", "float32", "cpu")


def test_pair_loads_and_shares_a_tokenizer(target: LoadedModel, drafter: LoadedModel) -> None:
    assert target.name == default_model_path("target") and drafter.name == default_model_path("drafter")
    assert target.fingerprint == drafter.fingerprint
    n_target = sum(p.numel() for p in target.model.parameters())
    n_drafter = sum(p.numel() for p in drafter.model.parameters())
    assert 2e6 <= n_target <= 10e6 and 0.3e6 <= n_drafter <= 1e6
    assert target.eos_token_ids == drafter.eos_token_ids == (target.tokenizer.eos_token_id,)


@pytest.mark.parametrize(
    "text",
    ["Tom has 3 apples and buys 12 more. How many now?", "  spaces, digits 0.25 + $1,000 ü €\n#### 42", ""],
)
def test_tokenizer_round_trips(target: LoadedModel, text: str) -> None:
    ids = target.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert target.tokenizer.decode(ids) == text


def speculative(target: LoadedModel, drafter_m: LoadedModel, prompt: list[int], k: int, n: int) -> list[int]:
    """The device's own round loop, verified in process by the edge's TargetSession."""
    drafter = Drafter(drafter_m, SamplingParams())
    session = TargetSession("t", target, SamplingParams(), prompt)
    session.prefill()
    limits = Limits(n, target.context_limit, 32, target.eos_token_ids)
    res = asyncio.run(speculative_generate(drafter, local_verifier(session), FixedK(k), prompt, limits))
    return res.token_ids


def test_greedy_is_deterministic_and_equals_target_generate(target: LoadedModel, drafter: LoadedModel) -> None:
    prompt = encode_prompt(target.tokenizer, "A baker makes 24 muffins and sells 9 of them. How many are left?")
    first = speculative(target, drafter, prompt, 4, 48)
    assert first == speculative(target, drafter, prompt, 4, 48)
    ref = target.model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt) :]
    ref_ids = ref.tolist()
    if target.tokenizer.eos_token_id in ref_ids:
        ref_ids = ref_ids[: ref_ids.index(target.tokenizer.eos_token_id) + 1]
    assert first == ref_ids  # eos included, nothing past it
    text = target.tokenizer.decode(first, skip_special_tokens=True)
    assert any(ch.isdigit() for ch in text)  # a trained model, not noise: it does arithmetic-shaped text


def test_fingerprint_is_the_ids_not_which_one_is_eos(pair: dict) -> None:  # type: ignore[type-arg]
    """A base and an instruct checkpoint of one family share every id and special token and differ
    in which is eos (Qwen2.5: <|endoftext|> against <|im_end|>): the same fingerprint, so the
    edge no longer refuses the pairing (the device stops at the edge's eos ids). Another
    vocabulary, or another set of special tokens, still differs."""
    from gelato.models import load_tokenizer, tokenizer_fingerprint

    base, instruct, other = (load_tokenizer(pair["target"]) for _ in range(3))
    for tok in (base, instruct):
        tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    instruct.eos_token = "<|im_end|>"
    assert base.eos_token_id != instruct.eos_token_id
    assert tokenizer_fingerprint(base) == tokenizer_fingerprint(instruct)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(base)  # without <|im_end|>
    other.add_tokens(["zzqx"])
    other.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(base)  # one more token
