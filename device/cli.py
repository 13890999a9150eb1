"""`gelato-device`: generate with a local drafter and a remote GELATO edge.

Contract (extend, don't break): `gelato-device --drafter MODEL --edge HOST:PORT (--prompt TEXT |
--prompts-file FILE) [--max-new-tokens N] [--policy fixed-4] [--temperature T] [--top-p P]
[--top-k K] [--seed S] [--no-chat-template] [--dtype D] [--device DEV] [--json] [--meter M]
[--device-profile P] [--radio R] [--trace FILE]`. FILE is JSONL
with `prompt` (or GSM8K's `question`) per line. With --json, one JSON object per prompt on stdout
(`prompt`, `text`, `token_ids` — generated ids only, eos included when produced — `n_tokens`,
`rounds`, `drafted`, `accepted`, `elapsed_s`, `tokens_per_s`, `energy_j`, `energy_j_per_token`,
`energy_source`, `energy_kind`, `bytes_up`, `bytes_down`, ...); energy is null, never 0, when the
meter cannot read. `--trace` writes one JSON line per round. Exit status 1 when the edge
refuses, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from device.client import EdgeClient, EdgeError, GenerationResult
from device.drafter import DEFAULT_TOP_M, Drafter
from device.energy import EnergyAccountant
from device.policy import Policy, parse_policy
from gelato.cli_common import add_model_args, endpoint, fail, first_failed, setup_torch_threads
from gelato.models import LoadedModel, ModelLoadError, encode_prompt, load_model
from gelato.power import PROFILES, RADIOS, MeterUnavailable, NullMeter, open_meter, radio_profile
from gelato.types import SamplingParams, Telemetry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato-device", description="GELATO device: draft locally, verify on the edge")
    p.add_argument("--drafter", default=None, help="hub id or local folder (default: the embedded tiny drafter)")
    p.add_argument("--edge", type=endpoint, default="127.0.0.1:50051", help="HOST:PORT of gelato-edge")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts-file", type=Path, help="JSONL with 'prompt' or 'question' per line")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of the file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--policy", default="fixed-4", help="draft-length policy, e.g. fixed-4 (fixed-0: edge-only)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-m", type=int, default=DEFAULT_TOP_M, help="draft support sent per token when sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt text as is")
    p.add_argument("--connect-timeout-s", type=float, default=60.0)
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


def result_record(prompt: str, res: GenerationResult, loaded: LoadedModel, policy: Policy) -> dict[str, Any]:
    s = res.stats
    n = len(res.token_ids)
    return {
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
        "drafter": loaded.name,
        "target": res.target_model,
    }


def open_accountant(args: argparse.Namespace) -> EnergyAccountant:
    meter = NullMeter("--meter none") if args.meter == "none" else open_meter(args.meter, args.device_profile)
    return EnergyAccountant(meter, radio_profile(args.radio))


async def run(
    args: argparse.Namespace, prompts: list[str], loaded: LoadedModel, acct: EnergyAccountant, trace: TextIO | None
) -> int:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    drafter = Drafter(loaded, params, top_m=args.top_m)
    client = EdgeClient(args.edge)
    try:
        try:
            await client.info(timeout_s=args.connect_timeout_s)
        except EdgeError as exc:
            return fail(f"cannot reach gelato-edge at {args.edge}: {exc}", 1)
        for index, prompt in enumerate(prompts):
            policy = parse_policy(args.policy)
            ids = encode_prompt(loaded.tokenizer, prompt, chat_template=not args.no_chat_template)

            def write_round(tele: Telemetry, index: int = index) -> None:
                if trace is not None:
                    row = {"prompt_index": index, **{k: _json_value(v) for k, v in asdict(tele).items()}}
                    trace.write(json.dumps(row) + "\n")

            try:
                res = await client.generate(drafter, ids, args.max_new_tokens, policy, acct, write_round)
            except EdgeError as exc:
                return fail(str(exc), 1)
            rec = result_record(prompt, res, loaded, policy)
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                print(rec["text"], flush=True)
                print(
                    f"-- {rec['n_tokens']} tokens in {rec['elapsed_s']:.2f}s ({rec['tokens_per_s']:.1f} tok/s), "
                    f"{rec['rounds']} rounds, accepted {rec['accepted']}/{rec['drafted']} drafts",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await client.close()
        acct.meter.close()
        if trace is not None:
            trace.close()
    return 0


def _json_value(v: Any) -> Any:
    return finite_or_none(v) if isinstance(v, float) else v


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        parse_policy(args.policy)
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
        ]
    )
    if broken:
        return fail(broken)
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
