"""Greedy losslessness between two real OS processes over loopback gRPC.

For K in {0, 1, 3, 8}, every controller policy (ar-edge, heuristic, entropy, adaedl, lyapunov,
gelato with and without an energy budget, pre-drafting during the round trip, blocks sent ahead of
their parent's verdict) and two drafters
(one that mostly agrees with the target, one that never does), `gelato-device` output must equal
the target's own `generate(do_sample=False)` token for token, eos included: where a policy ends a
block never changes what the target emits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gelato.models import encode_prompt, load_model
from tests.conftest import EdgeProcess, run_device, target_greedy

MAX_NEW = 24


@pytest.fixture(scope="module")
def reference(pair: dict[str, Path], prompts: list[str]) -> list[list[int]]:
    """The target's own greedy generations (`target_greedy`)."""
    target = load_model(str(pair["target"]), "target", "float32", "cpu")
    return [target_greedy(target, encode_prompt(target.tokenizer, text), MAX_NEW) for text in prompts]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory, prompts: list[str]) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


CONTROLLED = [
    ["--policy", "ar-edge"],
    ["--policy", "ar-edge", "--stream-tokens", "1"],
    ["--policy", "heuristic"],
    ["--policy", "entropy", "--entropy-threshold", "0.5"],
    ["--policy", "adaedl"],
    ["--policy", "lyapunov"],
    ["--policy", "gelato"],
    ["--policy", "gelato", "--energy-budget-j-per-token", "0.002", "--v", "5", "--meter", "cpu-model"],
    ["--policy", "fixed-4", "--pipeline", "local"],
    ["--policy", "gelato", "--pipeline", "local"],
    ["--policy", "fixed-4", "--pipeline", "send-ahead"],
    ["--policy", "gelato", "--pipeline", "send-ahead", "--ahead-blocks", "3"],
]
FIXED = [["--policy", f"fixed-{k}"] for k in (0, 1, 3, 8)]
# With a budget; pipelined (a drafter that never agrees: every block sent ahead is stale).
NEVER = FIXED + [p for p in CONTROLLED if (p[1] == "gelato" and len(p) > 2) or "send-ahead" in p]
CASES = [("drafter_agree", p) for p in FIXED + CONTROLLED] + [("drafter_never", p) for p in NEVER]


@pytest.mark.parametrize(("drafter", "policy"), CASES, ids=[f"{d}-{' '.join(p[1:])}" for d, p in CASES])
def test_greedy_equals_target_generate(
    pair: dict[str, Path],
    edge: EdgeProcess,
    prompts_file: Path,
    reference: list[list[int]],
    drafter: str,
    policy: list[str],
) -> None:
    args = ["--drafter", str(pair[drafter]), "--edge", edge.address, "--prompts-file", str(prompts_file)]
    res = run_device([*args, *policy, "--max-new-tokens", str(MAX_NEW), "--json"])
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(records) == len(reference) == 20
    for rec, ref in zip(records, reference, strict=True):
        assert rec["token_ids"] == ref, rec["prompt"]
        assert rec["n_tokens"] == len(ref)
        assert rec["stop_reason"] in ("eos", "max_new_tokens")
    drafted = sum(r["drafted"] for r in records)
    accepted = sum(r["accepted"] for r in records)
    total = {k: sum(r[k] for r in records) for k in ("predrafted_rounds", "sent_ahead", "stale_blocks", "sent_empty")}
    # The pipelined cases pipelined (a --pipeline lost on the way would pass on tokens alone).
    if "send-ahead" in policy:
        assert total["sent_ahead"] + total["sent_empty"] > 0, total
        if drafter == "drafter_never" and policy[1] == "fixed-4":
            assert total["stale_blocks"] > 0, total  # every guess after a rejection is wrong
    elif "local" in policy:
        assert total["sent_ahead"] == total["sent_empty"] == 0, total
        if policy[1] == "fixed-4":  # gelato pre-drafts only where its estimates say it pays
            assert total["predrafted_rounds"] > 0, total
    else:
        assert total == {"predrafted_rounds": 0, "sent_ahead": 0, "stale_blocks": 0, "sent_empty": 0}, total
    if policy[1] in ("fixed-0", "ar-edge"):
        assert drafted == 0
        assert all(r["rounds"] == r["n_tokens"] for r in records)
    elif drafter == "drafter_never":
        assert accepted == 0
        if policy[1] == "gelato":  # the controller learns that drafting never pays and stops
            assert drafted < 0.5 * sum(r["rounds"] for r in records), (drafted, [r["rounds"] for r in records])
            if "--energy-budget-j-per-token" in policy:
                assert all(r["q_deficit_j"] is not None for r in records)
                assert any(r["q_deficit_j"] > 0 for r in records)  # ~10 mJ/token against 2: a backlog
        else:
            assert drafted > 0
    else:  # every drafting policy drafted with the agreeing drafter (one that drafted nothing
        # would give the target's tokens too: losslessness would be tested vacuously)
        assert drafted > 0 and accepted / drafted > 0.5, f"agreeing drafter accepted only {accepted}/{drafted}"


@pytest.mark.parametrize("policy", ["ar-edge", "gelato", "fixed-3 --pipeline send-ahead"])
def test_the_device_ends_where_the_target_does_not_where_its_drafter_would(
    pair: dict[str, Path], tmp_path: Path, policy: str
) -> None:
    """Same tokenizer, but the target's generation config lists one more end token than the
    drafter's (as checkpoints of one family may): the generation ends at the target's, as the
    target's own `generate` does. The device ended at its drafter's end tokens only: it went on
    past the target's end (ar-edge then waited for a token the edge never streams)."""
    import shutil

    target_dir = tmp_path / "target"
    shutil.copytree(pair["target"], target_dir)
    target = load_model(str(target_dir), "target", "float32", "cpu")
    ids = torch.tensor([encode_prompt(target.tokenizer, "Ava has 12 apples.")])
    pad_ids = list(range(target.vocab_size, target.model.config.vocab_size))  # past the tokenizer: never emitted
    plain = target.model.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=None, suppress_tokens=pad_ids, pad_token_id=0
    )[0, ids.shape[1] :]
    stop = int(plain[4])  # a token the target emits 5th, made an end token
    config = json.loads((target_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], stop]
    (target_dir / "generation_config.json").write_text(json.dumps(config))
    want = plain.tolist()[: plain.tolist().index(stop) + 1]
    edge = EdgeProcess(["--target", str(target_dir)])
    try:
        args = ["--drafter", str(pair["drafter_agree"]), "--edge", edge.address, "--prompt", "Ava has 12 apples."]
        res = run_device([*args, "--policy", *policy.split(), "--max-new-tokens", "12", "--json"], timeout_s=120)
    finally:
        edge.stop()
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["token_ids"] == want and rec["stop_reason"] == "eos", (rec["token_ids"], want, rec["stop_reason"])


@pytest.mark.parametrize("policy", ["fixed-3", "ar-edge"])
def test_a_target_with_no_end_token_runs_to_its_limit(pair: dict[str, Path], tmp_path: Path, policy: str) -> None:
    """A target whose tokenizer and generation config name no end token never ends at one: the
    device's output is its greedy decoding up to --max-new-tokens, even where the drafter's own end
    token comes. The edge said `eos_token_ids` empty, which the device read as an older edge that
    did not say, and ended at its drafter's (here a token the target emits 4th)."""
    import shutil

    target_dir, drafter_dir = tmp_path / "target", tmp_path / "drafter"
    shutil.copytree(pair["target"], target_dir)
    shutil.copytree(pair["drafter_agree"], drafter_dir)
    for name, key in (("generation_config.json", "eos_token_id"), ("config.json", "eos_token_id")):
        config = json.loads((target_dir / name).read_text())
        config.pop(key, None)
        (target_dir / name).write_text(json.dumps(config))
    tok_config = json.loads((target_dir / "tokenizer_config.json").read_text())
    tok_config["eos_token"] = None
    (target_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    target = load_model(str(target_dir), "target", "float32", "cpu")
    assert target.eos_token_ids == ()
    ids = torch.tensor([encode_prompt(target.tokenizer, "Ava has 12 apples.")])
    pad_ids = list(range(target.vocab_size, target.model.config.vocab_size))
    plain = target.model.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=None, suppress_tokens=pad_ids, pad_token_id=0
    )[0, ids.shape[1] :].tolist()
    config = json.loads((drafter_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], plain[3]]  # the drafter would end at the 4th token
    (drafter_dir / "generation_config.json").write_text(json.dumps(config))
    edge = EdgeProcess(["--target", str(target_dir)])
    try:
        args = ["--drafter", str(drafter_dir), "--edge", edge.address, "--prompt", "Ava has 12 apples."]
        res = run_device([*args, "--policy", policy, "--max-new-tokens", "12", "--json"], timeout_s=120)
    finally:
        edge.stop()
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["token_ids"] == plain and rec["stop_reason"] == "max_new_tokens", (rec["token_ids"], plain)
