"""One `gelato-device` run once its settings are valid: the prompts through the edge (or the drafter
alone), one record per prompt on stdout, the exit status.

Contract: `run(config, credentials, token, prompts, loaded, acct, trace)` generates every prompt
with one policy (one controller state for the whole run) and returns the CLI's exit status (the
module `gelato.device.cli` documents the records and statuses). Kept apart from the CLI so that
`gelato-device --help` and a settings error answer without importing torch and transformers.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TextIO

import grpc

from gelato.cli_common import fail, say
from gelato.device.client import EdgeClient
from gelato.device.client_errors import EdgeError, EdgeUnreachable
from gelato.device.config import DeviceConfig
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.generate import (
    GenerationResult,
    GenerationStats,
    Limits,
    Offload,
    self_verifier,
    speculative_generate,
)
from gelato.device.policy import Policy, parse_policy
from gelato.models import LoadedModel, encode_prompt
from gelato.types import Telemetry


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: an unavailable reading is written as null, never as 0."""
    return x if math.isfinite(x) else None


def controller_record(policy: Policy) -> dict[str, Any]:
    """The controller's long-run state after this prompt (it carries over to the next one)."""
    q = policy.controller.queue
    return {
        "energy_budget_j_per_token": q.budget_j_per_token if q else None,
        "q_deficit_j": q.q_j if q else None,
        "long_run_j_per_token": finite_or_none(q.j_per_token) if q else None,
    }


def pipeline_record(s: GenerationStats) -> dict[str, int]:
    """What pipelining did, from the rounds (all 0 without it): `predrafted_rounds` rounds with a
    pre-draft (or a block sent ahead) in flight behind them, `predraft_hits` of them that it
    started; `sent_ahead` blocks with drafts or a guess sent before their parent's verdict
    (verified or stale), `stale_blocks` of them answered stale, `sent_empty` empty blocks sent
    ahead (counted apart, verified or stale); `guess_checks` fully accepted blocks nothing was
    drafted after whose guess the next block checked, `guess_check_hits` of them right."""
    log = s.rounds_log
    empty = sum(t.sent_ahead and t.follow for t in log)
    stale = sum(t.stale_blocks for t in log)
    return {
        "predrafted_rounds": sum(t.predrafted > 0 for t in log),
        "predraft_hits": sum(t.predraft_hit for t in log),
        "sent_ahead": sum(t.sent_ahead for t in log) - empty + stale,
        "stale_blocks": stale,
        "sent_empty": empty + sum(t.stale_empty for t in log),
        "guess_checks": sum(t.bonus_guess_hit is not None for t in log),
        "guess_check_hits": sum(t.bonus_guess_hit is True for t in log),
    }


def result_record(prompt: str, res: GenerationResult, loaded: LoadedModel, policy: Policy) -> dict[str, Any]:
    s = res.stats
    n = len(res.token_ids)
    return {
        "stop_reason": s.stop_reason,
        **({"error": res.error} if res.error else {}),
        "failovers": res.failovers,
        "prompt": prompt,
        "text": loaded.tokenizer.decode(res.token_ids, skip_special_tokens=True),
        "token_ids": res.token_ids,
        "n_tokens": len(res.token_ids),
        "rounds": s.rounds,
        "drafted": s.drafted,
        "accepted": s.accepted,
        # ar-device: no target checks its drafts, so no acceptance (its "accepted" counts the
        # drafts each block emits before its last, as the round's arithmetic needs).
        "acceptance_rate": s.accepted / s.drafted if s.drafted and not policy.local_only else None,
        "mean_draft_len": s.drafted / s.rounds if s.rounds else 0.0,
        "elapsed_s": round(res.elapsed_s, 4),
        "tokens_per_s": round(res.tokens_per_s, 2),
        "draft_s": round(s.draft_s, 4),
        "edge_compute_s": round(s.edge_compute_ms / 1e3, 4),
        "edge_share_s": round(s.edge_share_ms / 1e3, 4),
        "energy_j": finite_or_none(s.energy_j),
        "energy_j_per_token": finite_or_none(s.energy_j / n) if n else None,
        "radio_j": round(s.radio_j, 6),
        "energy_source": s.energy_source,
        "energy_kind": s.energy_kind,
        "radio_model": s.radio_model or None,
        "bytes_up": s.bytes_up,
        "bytes_down": s.bytes_down,
        **pipeline_record(s),
        "policy": policy.name,
        **controller_record(policy),
        "drafter": loaded.name,
        "target": res.target_model,
    }


async def run(
    config: DeviceConfig,
    credentials: grpc.ChannelCredentials | None,
    token: str | None,
    prompts: list[str],
    loaded: LoadedModel,
    acct: EnergyAccountant,
    trace: TextIO | None,
) -> int:
    drafter = Drafter(loaded, config.sampling, top_m=config.top_m)
    policy = parse_policy(config.policy, config.controller)  # one controller for the whole run
    client = EdgeClient(
        config.edge,
        connect_timeout_s=config.connect_timeout_s,
        verdict_timeout_s=config.verdict_timeout_s,
        deadline_s=config.session_deadline_s,
        credentials=credentials,
        token=token,
        server_name=config.tls_server_name,
        failovers=config.failovers,
        insecure=config.insecure,
        edge_wait_s=config.edge_wait_s,
    )
    failed = ran = 0
    try:
        if not policy.local_only:
            try:
                await client.wait_ready(config.edge_wait_s, any_unavailable=False)  # loading: wait
            except (EdgeUnreachable, EdgeError) as exc:
                why = str(exc) if isinstance(exc, EdgeUnreachable) else f"gelato-edge at {config.edge}: {exc}"
                if config.json:  # a consumer of stdout gets a record: the first prompt's
                    emit(config, error_record(prompts[0], policy, why))
                return fail(why, 1)
        for index, prompt in enumerate(prompts):
            ran = index + 1
            try:
                res = await generate_one(config, client, drafter, policy, acct, prompt, index, trace)
            except EdgeUnreachable as exc:  # every later prompt would fail the same way
                if config.json:  # (without --json, `fail` prints the one error line)
                    emit(config, error_record(prompt, policy, str(exc)))
                return fail(str(exc), 1)
            except (EdgeError, ValueError) as exc:  # this prompt's own problem: report it, go on
                emit(config, error_record(prompt, policy, str(exc)))
                failed += 1
            else:
                emit(config, result_record(prompt, res, loaded, policy))
                failed += res.stats.stop_reason == "error"
            if failed and config.fail_fast:
                break
    finally:
        await client.close()
        acct.meter.close()
        if trace is not None:
            trace.close()
    if failed:
        unrun = f"; --fail-fast stopped there, {len(prompts) - ran} not run" if ran < len(prompts) else ""
        return fail(f"{failed} of {ran} prompts run failed (their lines say why){unrun}", 1)
    return 0


async def generate_one(
    config: DeviceConfig,
    client: EdgeClient,
    drafter: Drafter,
    policy: Policy,
    acct: EnergyAccountant,
    prompt: str,
    index: int,
    trace: TextIO | None,
) -> GenerationResult:
    if not prompt.strip():
        raise ValueError("empty prompt")
    ids = encode_prompt(drafter.loaded.tokenizer, prompt, chat_template=not config.no_chat_template)

    session = [0]  # the session of this prompt the rounds belong to (0, then +1 per failover)

    def set_session(n: int) -> None:
        session[0] = n

    def write_round(tele: Telemetry) -> None:
        if trace is not None:
            row = {"prompt_index": index, "session": session[0], **{k: _json_value(v) for k, v in asdict(tele).items()}}
            trace.write(json.dumps(row) + "\n")
            trace.flush()  # whole lines as rounds end: a reader (tail -f, a test) never sees half of one

    if policy.local_only:
        drafter.begin_generation(ids)  # a repeated prompt samples afresh (the client does so for the rest)
        return await generate_alone(drafter, ids, config.max_new_tokens, policy, acct, write_round, client.offload)
    return await client.generate(drafter, ids, config.max_new_tokens, policy, acct, write_round, set_session)


def error_record(prompt: str, policy: Policy, error: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "error": error,
        "stop_reason": "error",
        "token_ids": [],
        "n_tokens": 0,
        "policy": policy.name,
    }


def emit(config: DeviceConfig, rec: dict[str, Any]) -> None:
    """One result on stdout (a JSON line with --json); errors and statistics on stderr."""
    if config.json:
        print(json.dumps(rec), flush=True)
        return
    if "text" in rec:
        print(rec["text"], flush=True)
    if rec.get("error"):
        say(f"error: {rec['error']}", logging.ERROR)
    if "rounds" in rec:
        checked = rec["acceptance_rate"] is not None or not rec["drafted"]
        # ar-device: no target checks its drafts, so no "accepted" (its count is the round's arithmetic)
        drafts = f"accepted {rec['accepted']}/{rec['drafted']} drafts" if checked else "its own drafts, unchecked"
        say(
            f"-- {rec['n_tokens']} tokens in {rec['elapsed_s']:.2f}s ({rec['tokens_per_s']:.1f} tok/s), "
            f"{rec['rounds']} rounds, {drafts}, stop: {rec['stop_reason']}",
            logging.INFO,
        )


async def generate_alone(
    drafter: Drafter,
    ids: list[int],
    max_new_tokens: int,
    policy: Policy,
    acct: EnergyAccountant,
    on_round: Callable[[Telemetry], None],
    offload: Offload,
) -> GenerationResult:
    """`ar-device`: the drafter decodes alone, no edge (a reference point, not the target's output).
    Its forwards go through `offload` (the client's drafter thread), as with an edge: a signal
    handler or other task on the event loop is not held up for a whole block's forwards."""
    loaded = drafter.loaded
    limits = Limits(max_new_tokens, loaded.context_limit, max_new_tokens, loaded.eos_token_ids)
    verify = self_verifier(drafter, offload)
    res = await speculative_generate(drafter, verify, policy, ids, limits, acct, on_round, offload)
    res.target_model = "(none: ar-device)"
    return res


def _json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    return finite_or_none(v) if isinstance(v, float) else v
