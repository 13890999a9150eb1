"""`gelato-device`: generate with a local drafter and a remote GELATO edge.

Contract (extend, don't break): `gelato-device --drafter MODEL --edge HOST:PORT (--prompt TEXT |
--prompts-file FILE) [options]`; `gelato-device --help` lists every flag with its default (the
policy and controller constants included). With --json, one JSON object per prompt on stdout
(README "CLI" lists the fields); energy is null, never 0, when the meter cannot read. A prompt
that fails (the edge refuses it, or the session breaks mid-generation) gets its own line with
`error` and `stop_reason: "error"` — with the tokens generated until then — and the run goes on
(`--fail-fast`: stop there); an unreachable edge ends the run. Exit status 0 when every prompt
succeeded, 1 when any failed or the edge cannot be reached, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import grpc

from device.client import EdgeClient, EdgeError, EdgeUnreachable
from device.drafter import DEFAULT_TOP_M, Drafter
from device.energy import EnergyAccountant
from device.generate import GenerationResult, Limits, self_verifier, speculative_generate
from device.policy import PIPELINE_MODES, Policy, PolicyOptions, parse_policy
from gelato.cli_common import EnvArgumentParser, add_model_args, endpoint, fail, first_failed, setup_torch_threads
from gelato.models import LoadedModel, ModelLoadError, encode_prompt, load_model
from gelato.power import PROFILES, RADIOS, MeterUnavailable, NullMeter, open_meter, radio_profile
from gelato.security import SecurityConfigError, channel_credentials, read_token
from gelato.types import SamplingParams, Telemetry


def build_parser() -> argparse.ArgumentParser:
    p = EnvArgumentParser(
        prog="gelato-device", description="GELATO device: draft locally, verify on the edge", env_prefix="GELATO_DEVICE"
    )
    p.add_argument("--drafter", default=None, help="hub id or local folder (default: the embedded tiny drafter)")
    p.add_argument(
        "--edge",
        type=endpoint,
        default="127.0.0.1:50051",
        help="HOST:PORT of gelato-edge, or a gRPC target naming replicas (dns:///edge:50051, ipv4:A:P,B:P)",
    )
    p.add_argument(
        "--failovers",
        type=int,
        default=2,
        help="re-open a session this many times when its edge goes away mid-generation (default 2)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts-file", type=Path, help="JSONL with 'prompt' or 'question' per line")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of the file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--policy",
        default="fixed-4",
        help="draft-length policy: fixed-K (e.g. fixed-4; fixed-0: the edge decodes alone), heuristic, entropy, "
        "adaedl, lyapunov, gelato, ar-device (the drafter alone, no edge)",
    )
    d = PolicyOptions()
    p.add_argument(
        "--energy-budget-j-per-token",
        type=float,
        default=None,
        help="device energy budget ē in J/token for lyapunov/gelato (default: none, pure throughput)",
    )
    p.add_argument("--v", type=float, default=d.v, help=f"throughput weight V, in tokens of budget (default {d.v:g})")
    p.add_argument("--k-max", type=int, default=d.k_max, help="hard cap on drafts per round (default 0: the edge's)")
    p.add_argument(
        "--entropy-threshold",
        type=float,
        default=d.entropy_threshold,
        help=f"entropy policy: stop after a token above this entropy in nats (default {d.entropy_threshold:g})",
    )
    p.add_argument("--adaedl-lambda", type=float, default=d.adaedl_lambda, help="adaedl: stop when 1-sqrt(γH) < λ")
    p.add_argument("--adaedl-gamma", type=float, default=d.adaedl_gamma, help="adaedl: γ (default 0.2)")
    p.add_argument(
        "--pipeline",
        choices=list(PIPELINE_MODES),
        default="off",
        help="local: keep drafting while a block is in flight, a hit starts the next block at once; send-ahead: "
        "also send the next blocks before the verdict (the edge verifies them only if the block before was "
        "fully accepted with the guessed token), where the edge supports it (default off)",
    )
    p.add_argument(
        "--ahead-blocks",
        type=int,
        default=d.ahead_blocks,
        help=f"send-ahead: blocks in flight past the awaited one, at most (default {d.ahead_blocks})",
    )
    p.add_argument(
        "--estimator-halflife-rounds",
        type=float,
        default=d.halflife_rounds,
        help=f"half-life of the controller's time/energy/acceptance estimates (default {d.halflife_rounds:g})",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-m", type=int, default=DEFAULT_TOP_M, help="draft support sent per token when sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt text as is")
    p.add_argument(
        "--connect-timeout-s",
        type=float,
        default=10.0,
        help="how long to wait for the edge to answer before reporting it unreachable (default 10)",
    )
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the edge's certificate: connect with TLS")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate, for an edge that requires one (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", default=None, help="name in the edge's certificate, if not --edge's host")
    p.add_argument("--auth-token-file", default=None, help="file holding the edge's bearer token")
    p.add_argument(
        "--fail-fast", action="store_true", help="stop at the first prompt that fails (default: report it, go on)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    p.add_argument(
        "--meter", default="auto", help="auto, nvml, rapl, jetson, cpu-model, replay:FILE or none (default: auto)"
    )
    p.add_argument("--device-profile", default="phone", choices=sorted(PROFILES), help="for the cpu-model estimate")
    p.add_argument("--radio", default="wifi", choices=[*sorted(RADIOS), "none"], help="radio energy model")
    p.add_argument("--trace", type=Path, default=None, help="write one JSON line per round here")
    add_model_args(p)
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    prompts = []
    with open(args.prompts_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{args.prompts_file}:{n}: not JSON ({exc.msg})") from exc
            text = rec.get("prompt", rec.get("question")) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{args.prompts_file}:{n}: needs a string 'prompt' or 'question'")
            prompts.append(text)
    return prompts[: args.limit] if args.limit is not None else prompts


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: an unavailable reading is written as null, never as 0."""
    return x if math.isfinite(x) else None


def policy_options(args: argparse.Namespace) -> PolicyOptions:
    return PolicyOptions(
        k_max=args.k_max,
        budget_j_per_token=args.energy_budget_j_per_token,
        v=args.v,
        entropy_threshold=args.entropy_threshold,
        adaedl_gamma=args.adaedl_gamma,
        adaedl_lambda=args.adaedl_lambda,
        halflife_rounds=args.estimator_halflife_rounds,
        pipeline=args.pipeline,
        ahead_blocks=args.ahead_blocks,
    )


def controller_record(policy: Policy) -> dict[str, Any]:
    """The controller's long-run state after this prompt (it carries over to the next one)."""
    q = policy.controller.queue
    return {
        "energy_budget_j_per_token": q.budget_j_per_token if q else None,
        "q_deficit_j": q.q_j if q else None,
        "long_run_j_per_token": finite_or_none(q.j_per_token) if q else None,
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
        "acceptance_rate": s.accepted / s.drafted if s.drafted else None,
        "mean_draft_len": s.drafted / s.rounds if s.rounds else 0.0,
        "elapsed_s": round(res.elapsed_s, 4),
        "tokens_per_s": round(res.tokens_per_s, 2),
        "draft_s": round(s.draft_s, 4),
        "edge_compute_s": round(s.edge_compute_ms / 1e3, 4),
        "energy_j": finite_or_none(s.energy_j),
        "energy_j_per_token": finite_or_none(s.energy_j / n) if n else None,
        "radio_j": round(s.radio_j, 6),
        "energy_source": s.energy_source,
        "energy_kind": s.energy_kind,
        "bytes_up": s.bytes_up,
        "bytes_down": s.bytes_down,
        "policy": policy.name,
        **controller_record(policy),
        "drafter": loaded.name,
        "target": res.target_model,
    }


def transport_security(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """TLS credentials (when a CA or a client certificate is given) and the bearer token, read now
    so that a bad path costs no model load."""
    tls = args.tls_ca or args.tls_cert or args.tls_key
    credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls else None
    token = read_token(args.auth_token_file) if args.auth_token_file else None
    return credentials, token


def open_accountant(args: argparse.Namespace) -> EnergyAccountant:
    meter = NullMeter("--meter none") if args.meter == "none" else open_meter(args.meter, args.device_profile)
    return EnergyAccountant(meter, radio_profile(args.radio))


async def run(
    args: argparse.Namespace, prompts: list[str], loaded: LoadedModel, acct: EnergyAccountant, trace: TextIO | None
) -> int:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    drafter = Drafter(loaded, params, top_m=args.top_m)
    policy = parse_policy(args.policy, policy_options(args))  # one controller for the whole run
    client = EdgeClient(
        args.edge,
        connect_timeout_s=args.connect_timeout_s,
        credentials=args.credentials,
        token=args.token,
        server_name=args.tls_server_name,
        failovers=args.failovers,
    )
    failed = 0
    try:
        if not policy.local_only:
            try:
                await client.info()
            except EdgeUnreachable as exc:
                return fail(str(exc), 1)
            except EdgeError as exc:
                return fail(f"gelato-edge at {args.edge}: {exc}", 1)
        for index, prompt in enumerate(prompts):
            try:
                res = await generate_one(args, client, drafter, policy, acct, prompt, index, trace)
            except EdgeUnreachable as exc:  # every later prompt would fail the same way
                emit(args, error_record(prompt, policy, str(exc)))
                return fail(str(exc), 1)
            except (EdgeError, ValueError) as exc:  # this prompt's own problem: report it, go on
                emit(args, error_record(prompt, policy, str(exc)))
                failed += 1
            else:
                emit(args, result_record(prompt, res, loaded, policy))
                failed += res.stats.stop_reason == "error"
            if failed and args.fail_fast:
                break
    finally:
        await client.close()
        acct.meter.close()
        if trace is not None:
            trace.close()
    if failed:
        return fail(f"{failed} of {len(prompts)} prompts failed (their lines say why)", 1)
    return 0


async def generate_one(
    args: argparse.Namespace,
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
    ids = encode_prompt(drafter.loaded.tokenizer, prompt, chat_template=not args.no_chat_template)

    def write_round(tele: Telemetry) -> None:
        if trace is not None:
            row = {"prompt_index": index, **{k: _json_value(v) for k, v in asdict(tele).items()}}
            trace.write(json.dumps(row) + "\n")

    if policy.local_only:
        return await generate_alone(drafter, ids, args.max_new_tokens, policy, acct, write_round)
    return await client.generate(drafter, ids, args.max_new_tokens, policy, acct, write_round)


def error_record(prompt: str, policy: Policy, error: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "error": error,
        "stop_reason": "error",
        "token_ids": [],
        "n_tokens": 0,
        "policy": policy.name,
    }


def emit(args: argparse.Namespace, rec: dict[str, Any]) -> None:
    """One result on stdout (a JSON line with --json); errors and statistics on stderr."""
    if args.json:
        print(json.dumps(rec), flush=True)
        return
    if "text" in rec:
        print(rec["text"], flush=True)
    if rec.get("error"):
        print(f"error: {rec['error']}", file=sys.stderr, flush=True)
    if "rounds" in rec:
        print(
            f"-- {rec['n_tokens']} tokens in {rec['elapsed_s']:.2f}s ({rec['tokens_per_s']:.1f} tok/s), "
            f"{rec['rounds']} rounds, accepted {rec['accepted']}/{rec['drafted']} drafts, stop: {rec['stop_reason']}",
            file=sys.stderr,
            flush=True,
        )


async def generate_alone(
    drafter: Drafter,
    ids: list[int],
    max_new_tokens: int,
    policy: Policy,
    acct: EnergyAccountant,
    on_round: Callable[[Telemetry], None],
) -> GenerationResult:
    """`ar-device`: the drafter decodes alone, no edge (a reference point, not the target's output)."""
    loaded = drafter.loaded
    limits = Limits(max_new_tokens, loaded.context_limit, max_new_tokens, loaded.eos_token_ids)
    res = await speculative_generate(drafter, self_verifier(drafter), policy, ids, limits, acct, on_round)
    res.target_model = "(none: ar-device)"
    return res


def _json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    return finite_or_none(v) if isinstance(v, float) else v


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        policy_options(args).validate()
        parse_policy(args.policy, policy_options(args))
        SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k).validate()
        prompts = read_prompts(args)
    except (OSError, ValueError) as exc:
        return fail(str(exc))
    broken = first_failed(
        [
            ("--max-new-tokens must be >= 1", args.max_new_tokens >= 1),
            ("--top-m must be >= 1", args.top_m >= 1),
            ("--limit must be >= 0", args.limit is None or args.limit >= 0),
            ("--connect-timeout-s must be > 0", args.connect_timeout_s > 0),
            ("--failovers must be >= 0", args.failovers >= 0),
        ]
    )
    if broken:
        return fail(broken)
    try:
        args.credentials, args.token = transport_security(args)
    except SecurityConfigError as exc:
        return fail(str(exc))
    if not prompts:
        return fail("no prompts given")
    setup_torch_threads(args.threads)
    try:
        acct = open_accountant(args)
    except (MeterUnavailable, ValueError) as exc:
        return fail(f"--meter {args.meter}: {exc}")
    try:
        loaded = load_model(args.drafter, "drafter", args.dtype, args.device)
    except ModelLoadError as exc:
        return fail(str(exc))
    try:  # opened before any generation, so a bad path costs nothing
        trace = open(args.trace, "w", encoding="utf-8") if args.trace else None  # noqa: SIM115
    except OSError as exc:
        return fail(f"--trace: {exc}")
    return asyncio.run(run(args, prompts, loaded, acct, trace))


if __name__ == "__main__":
    raise SystemExit(main())
