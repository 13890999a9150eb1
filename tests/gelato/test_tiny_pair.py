"""The shipped embedded-default pair: loads through the real path, greedy is deterministic and
lossless, the tokenizer round-trips and both models share it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

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


def _tokenizer_copy(tmp_path: Path, name: str, edit_json: Any = None, edit_config: Any = None) -> Path:
    """The embedded target's tokenizer files in `tmp_path/name`, each edited by its function."""
    from gelato.models import ASSETS

    folder = tmp_path / name
    folder.mkdir()
    for file, edit in (("tokenizer.json", edit_json), ("tokenizer_config.json", edit_config)):
        data = json.loads((ASSETS / "target" / file).read_text())
        (folder / file).write_text(json.dumps(edit(data) if edit else data))
    return folder


def test_fingerprint_covers_how_text_becomes_ids(tmp_path: Path) -> None:
    """Two tokenizers with one vocabulary that split text differently (digits split one by one; a
    merge table cut short) are told apart: the fingerprint once hashed the vocabulary alone, and a
    drafter re-saved with another pre-tokenizer passed the session-open check while it fed the
    target ids the target's own tokenizer would never produce for that text."""
    from gelato.models import load_tokenizer, tokenizer_fingerprint

    def split_digits(d: dict[str, Any]) -> dict[str, Any]:
        digits = {"type": "Digits", "individual_digits": True}
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, d["pre_tokenizer"]]}
        return d

    def fewer_merges(d: dict[str, Any]) -> dict[str, Any]:
        d["model"]["merges"] = d["model"]["merges"][:50]
        return d

    same = load_tokenizer(_tokenizer_copy(tmp_path, "same"))
    base = tokenizer_fingerprint(same)
    text = "Ben has 34 marbles and 1250 stickers."
    for name, edit in (("digits", split_digits), ("merges", fewer_merges)):
        other = load_tokenizer(_tokenizer_copy(tmp_path, name, edit_json=edit))
        assert other.get_vocab() == same.get_vocab(), name  # one vocabulary ...
        assert other.encode(text) != same.encode(text), name  # ... other ids for the same text
        assert tokenizer_fingerprint(other) != base, name


def test_fingerprint_ignores_which_token_is_named_eos_or_pad(tmp_path: Path) -> None:
    """Checkpoints of one family that differ only in the role names of their special tokens (Llama 3
    base <|end_of_text|> against instruct <|eot_id|>) encode alike: one fingerprint (the role
    names were once hashed, and such a pair was refused at session open)."""
    from gelato.models import load_tokenizer, tokenizer_fingerprint

    def with_eot(d: dict[str, Any]) -> dict[str, Any]:
        new_id = max(t["id"] for t in d["added_tokens"]) + 1 + max(d["model"]["vocab"].values())
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        d["added_tokens"].append({"id": new_id, "content": "<|eot|>", **flags})
        return d

    def eos(name: str) -> Any:
        return lambda c: {**c, "eos_token": name, "pad_token": name}

    base = load_tokenizer(_tokenizer_copy(tmp_path, "base", with_eot, eos("<|endoftext|>")))
    instruct = load_tokenizer(_tokenizer_copy(tmp_path, "instruct", with_eot, eos("<|eot|>")))
    assert base.eos_token_id != instruct.eos_token_id and base.get_vocab() == instruct.get_vocab()
    assert tokenizer_fingerprint(base) == tokenizer_fingerprint(instruct)


def test_fingerprint_ignores_what_never_changes_an_id_and_covers_split_special_tokens(tmp_path: Path) -> None:
    """One tokenizer shipped as `tokenizer.json` and as `vocab.json` + `merges.txt` differs in its
    post processor and `trim_offsets` only (neither changes an id: GELATO encodes without added
    special tokens): the fingerprints differed and the edge refused the valid pair. And
    `split_special_tokens` (in tokenizer_config.json) turns a special token's text into plain-text ids, yet
    it was outside the fingerprint: the target was fed chat markers as text, unnoticed."""
    from gelato.models import encode_prompt, load_tokenizer, tokenizer_fingerprint

    def as_rebuilt(d: dict[str, Any]) -> dict[str, Any]:
        d["post_processor"] = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        }
        d["pre_tokenizer"]["trim_offsets"] = not d["pre_tokenizer"].get("trim_offsets", True)
        return d

    def split_special(c: dict[str, Any]) -> dict[str, Any]:
        c["split_special_tokens"] = True
        return c

    same = load_tokenizer(_tokenizer_copy(tmp_path, "same"))
    rebuilt = load_tokenizer(_tokenizer_copy(tmp_path, "rebuilt", edit_json=as_rebuilt))
    text = "Tom has 3 apples and buys 12 more."
    assert encode_prompt(rebuilt, text) == encode_prompt(same, text)
    assert tokenizer_fingerprint(rebuilt) == tokenizer_fingerprint(same)
    split = load_tokenizer(_tokenizer_copy(tmp_path, "split", edit_config=split_special))
    marked = "Q: 3 + 4?<|endoftext|>A: 7"  # a special token's text, as a chat template writes its markers
    assert encode_prompt(split, marked) != encode_prompt(same, marked)  # the marker, as plain text
    assert tokenizer_fingerprint(split) != tokenizer_fingerprint(same)
