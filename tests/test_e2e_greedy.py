"""Greedy losslessness between two real OS processes over loopback gRPC (SPEC §2.1).

For K in {0, 1, 3, 8} and two drafters (one that mostly agrees with the target, one that never
does), `gelato-device` output must equal the target's own `generate(do_sample=False)` token for
token, eos included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gelato.models import encode_prompt, load_model
from tests.conftest import EdgeProcess, run_device

MAX_NEW = 24


@pytest.fixture(scope="module")
def reference(pair: dict[str, Path], prompts: list[str]) -> list[list[int]]:
    """The target's own greedy generations (padding rows suppressed: SPEC §2.2)."""
    target = load_model(str(pair["target"]), "target", "float32", "cpu")
    pad_ids = list(range(target.vocab_size, target.model.config.vocab_size))
    outs = []
    for text in prompts:
        ids = torch.tensor([encode_prompt(target.tokenizer, text)])
        gen = target.model.generate(
            ids,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            suppress_tokens=pad_ids,
            eos_token_id=list(target.eos_token_ids),
            pad_token_id=target.tokenizer.eos_token_id,
        )
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory, prompts: list[str]) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.mark.parametrize("drafter", ["drafter_agree", "drafter_never"])
@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_greedy_equals_target_generate(
    pair: dict[str, Path],
    edge: EdgeProcess,
    prompts_file: Path,
    reference: list[list[int]],
    drafter: str,
    k: int,
) -> None:
    args = ["--drafter", str(pair[drafter]), "--edge", edge.address, "--prompts-file", str(prompts_file)]
    res = run_device([*args, "--policy", f"fixed-{k}", "--max-new-tokens", str(MAX_NEW), "--json"])
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(records) == len(reference) == 20
    for rec, ref in zip(records, reference, strict=True):
        assert rec["token_ids"] == ref, rec["prompt"]
        assert rec["n_tokens"] == len(ref)
    drafted = sum(r["drafted"] for r in records)
    accepted = sum(r["accepted"] for r in records)
    if k == 0:
        assert drafted == 0
        assert all(r["rounds"] == r["n_tokens"] for r in records)
    elif drafter == "drafter_never":
        assert drafted > 0 and accepted == 0
    else:
        assert accepted / drafted > 0.5, f"agreeing drafter accepted only {accepted}/{drafted}"
