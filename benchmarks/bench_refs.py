"""References of `gelato-bench gsm8k` that are not device runs: transformers assisted generation in
one process, and the `oracle` bound from the run's own verdicts and costs.

Contract. `assisted(prompts, target, drafter, max_new_tokens, cpu)` runs
`target.generate(..., assistant_model=drafter)` greedily (transformers' own speculative decoding,
device and edge in one process, no network) per prompt and returns per-prompt token ids and
seconds plus a summary (tokens/s as a ratio of sums, `mode`; no device energy: the process is
both sides). When the configs' vocabulary sizes differ (padded embeddings), transformers insists
on universal assisted decoding (both tokenizers passed); `mode` says which ran.

`oracle(questions, reference, drafter, runs, k_cap)`: the bound that drafts exactly the tokens the
target will accept. Its acceptance comes from the verdicts: for greedy decoding a block
starting after t accepted tokens accepts exactly the leading agreements of the drafter's argmax
with the target's output from t on, so one teacher-forced drafter pass over the `ar-edge` output
(`gelato.benchmarks.traces.teacher_forced`) gives every verdict any block could get. Its costs are the
run's own: least-squares lines through the measured fixed-K rounds of this run (drafting and edge
seconds and wire bytes vs k; the median network time per round; device power while drafting and
while waiting, fitted to the rounds' metered energy). The rounds are replayed with the simulator's
engine (`gelato.benchmarks.simulate`); the same model replays every measured fixed-K too: the ratio of
measured to simulated round time and energy over those runs (the model's error on this machine,
e.g. forwards slowing after idle gaps) scales the bound's rounds, and the measured per-question
overheads outside rounds (prefill, session open/close, the radio tail) are added. `fidelity`
reports the calibrated model against every measured fixed-K.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from typing import Any

from gelato.benchmarks.bench_run import RunResult, summarize
from gelato.benchmarks.simulate import Channel, Costs, Device, RoundModel, Trace, agree_runs
from gelato.device.policy import parse_policy
from gelato.power import radio_profile


def _pin(cpu: int | None) -> set[int] | None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    return before


def assisted(
    prompts: list[list[int]], target: Any, drafter: Any, max_new_tokens: int, cpu: int | None = None
) -> dict[str, Any]:
    import torch

    before, threads = _pin(cpu), torch.get_num_threads()
    torch.set_num_threads(1)
    eos = list(target.eos_token_ids)
    ids_out, secs = [], []
    # transformers compares the configs' vocabulary sizes, and padded ones (Qwen2.5-7B's 152064 vs
    # 0.5B's 151936) differ with one tokenizer: it then needs both tokenizers (universal assisted
    # decoding, which re-tokenizes text between the models) — recorded as `mode`.
    sizes = (target.model.config.get_text_config().vocab_size, drafter.model.config.get_text_config().vocab_size)
    same = sizes[0] == sizes[1]
    extra = {} if same else {"tokenizer": target.tokenizer, "assistant_tokenizer": drafter.tokenizer}
    try:
        for prompt in prompts:
            x = torch.tensor([prompt])
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = target.model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    assistant_model=drafter.model,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=eos[0] if eos else 0,
                    **extra,
                )
            secs.append(time.perf_counter() - t0)
            gen = out[0, len(prompt) :].tolist()
            cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))  # eos included, as the device
            ids_out.append(gen[:cut])
    finally:
        torch.set_num_threads(threads)
        if before is not None:
            os.sched_setaffinity(0, before)
    tokens = sum(len(x) for x in ids_out)
    mode = "assisted decoding" if same else f"universal assisted decoding (config vocab sizes {sizes[0]} vs {sizes[1]})"
    return {"token_ids": ids_out, "seconds": secs, "tokens": tokens, "tokens_per_s": tokens / sum(secs), "mode": mode}


# ---------------------------------------------------------------- oracle


def oracle_traces(prompts: list[list[int]], outputs: list[list[int]], drafter: Any) -> list[Trace]:
    from gelato.benchmarks.traces import teacher_forced

    traces = []
    for prompt, out in zip(prompts, outputs, strict=True):
        if len(out) < 1:
            continue
        tf = teacher_forced(drafter, prompt, out)
        traces.append(
            Trace(tuple(tf["entropy"]), agree_runs(tf["agree"]), frozenset(tf["drafter_eos"]), len(out), len(prompt))
        )
    return traces


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


def _powers(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """e_compute = P_draft·t_draft + P_wait·(t_round − t_draft), least squares without intercept."""
    a = [(r["t_draft_s"], r["t_round_s"] - r["t_draft_s"], r["e_compute_j"]) for r in rows if r.get("e_compute_j")]
    sxx = sum(x * x for x, _, _ in a)
    syy = sum(y * y for _, y, _ in a)
    sxy = sum(x * y for x, y, _ in a)
    sxe = sum(x * e for x, _, e in a)
    sye = sum(y * e for _, y, e in a)
    det = sxx * syy - sxy * sxy
    if not a or abs(det) < 1e-18:
        return 2.5, 0.5
    return (sxe * syy - sye * sxy) / det, (sye * sxx - sxe * sxy) / det


class NoDraftingCosts(ValueError):
    """No fixed-K run drafted: nothing to fit the drafting costs to."""


def fit_model(
    fixed: list[RunResult],
    radio: str,
    context_limit: int,
    k_cap: int,
    radio_rates_mbit: tuple[float, float] = (0.0, 0.0),
) -> tuple[RoundModel, dict[str, Any]]:
    """`radio_rates_mbit`: the rates the devices' radio model was given (0: the model's own)."""
    rows = [r for run in fixed for r in run.rounds]
    drafting = [r for r in rows if r["k"] > 0]
    if not drafting:  # fitted to fixed-0 alone, the oracle would draft for free: no bound at all
        raise NoDraftingCosts("the oracle needs a fixed-K run with K >= 1: its rounds give the drafting costs")
    d0, d1 = _line([float(r["k"]) for r in drafting], [r["t_draft_s"] for r in drafting])
    ks = [float(r["k"]) for r in rows]
    e0, e1 = _line(ks, [r["t_edge_compute_s"] + r["t_edge_queue_s"] for r in rows])
    u0, u1 = _line(ks, [float(r["bytes_up"]) for r in rows])
    down = statistics.fmean(r["bytes_down"] for r in rows)
    prof = radio_profile(radio, *radio_rates_mbit)
    transfer = sum(prof.transfer_s(round(u0 + u1 * 4), round(down))) if prof else 0.0
    rtt = max(statistics.median(r["t_net_s"] for r in rows) - transfer, 0.0)
    p_draft, p_wait = _powers(rows)
    costs = Costs(max(d0, 0.0), max(d1, 0.0), max(e0, 0.0), max(e1, 0.0), u0, u1, down)
    ch = Channel(
        rtt_s=rtt, radio=prof, p_draft_w=p_draft, p_wait_w=p_wait, max_draft=k_cap, context_limit=context_limit
    )
    fitted = {
        "draft_s": [d0, d1],
        "edge_s": [e0, e1],
        "bytes_up": [u0, u1],
        "bytes_down": down,
        "t_net_s": rtt,
        "p_draft_w": p_draft,
        "p_wait_w": p_wait,
    }
    return RoundModel(costs, ch), fitted


def replay(traces: list[Trace], model: RoundModel, policy: str | None) -> dict[str, Any]:
    """Every trace once, in order, on one simulated device: the rounds' sums."""
    dev = Device(None if policy is None else parse_policy(policy), model, seed=0)
    for t in traces:
        dev.generate(t)
    tot = dev.totals
    return {
        "time_s": tot.time_s,
        "energy_j": tot.energy_j,
        "tokens": tot.tokens,
        "mean_draft_len": tot.drafted / tot.rounds,
        "acceptance": tot.accepted / tot.drafted if tot.drafted else None,
        "rounds": tot.rounds,
    }


def overheads(fixed: list[RunResult]) -> dict[str, float]:
    """Per question, what the rounds do not contain (prompt prefill, session open/close, the radio's
    tail): measured totals minus the sums of its rounds, averaged over the fixed-K runs."""
    t_over, e_over = [], []
    for run in fixed:
        by_q: dict[int, list[dict[str, Any]]] = {}
        for r in run.rounds:
            by_q.setdefault(r["question"], []).append(r)
        for rec in run.records:
            rows = by_q.get(rec["question"], [])
            t_over.append(rec["elapsed_s"] - sum(r["t_round_s"] for r in rows))
            if rec.get("energy_j") is not None:
                e_over.append(rec["energy_j"] - sum(r["e_j"] or 0.0 for r in rows))
    return {"time_s": statistics.fmean(t_over), "energy_j": statistics.fmean(e_over) if e_over else 0.0}


def measured_rounds(run: RunResult) -> dict[str, float]:
    return {
        "time_s": sum(r["t_round_s"] for r in run.rounds),
        "energy_j": sum(r["e_j"] or 0.0 for r in run.rounds),
    }


def oracle(
    traces: list[Trace],
    fixed: list[RunResult],
    radio: str,
    context_limit: int,
    k_caps: tuple[int, ...],
    radio_rates_mbit: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """Oracle rows (one per cap), calibrated, and the model's fidelity on the measured fixed-K runs.
    Calibration: the rounds' simulated time and energy × the mean over the fixed-K runs of each
    run's measured / simulated (over its rounds), plus the measured per-question overheads
    (`overheads`). Each run's fidelity is scored with that run left out of the scales (`held_out`;
    with one fixed-K run there is nothing else to calibrate on: in-sample, and it says so). The cost
    fit itself uses every run."""
    model, fitted = fit_model(fixed, radio, context_limit, max(k_caps), radio_rates_mbit)
    over = overheads(fixed)
    sims = {run.spec.label: replay(traces, model, run.spec.policy) for run in fixed}
    meas = {run.spec.label: measured_rounds(run) for run in fixed}

    def scales(leave_out: str | None = None) -> tuple[float, float]:
        keys = [k for k in sims if k != leave_out] or list(sims)
        return (
            statistics.fmean(meas[k]["time_s"] / sims[k]["time_s"] for k in keys),
            statistics.fmean(meas[k]["energy_j"] / sims[k]["energy_j"] for k in keys),
        )

    scale_t, scale_e = scales()
    nq = len(traces)

    def calibrated(sim: dict[str, Any], scale: tuple[float, float]) -> tuple[float, float]:
        t = sim["time_s"] * scale[0] + over["time_s"] * nq
        e = sim["energy_j"] * scale[1] + over["energy_j"] * nq
        return sim["tokens"] / t, e / sim["tokens"]

    fidelity = []
    for run in fixed:
        s = summarize(run)
        tps, jpt = calibrated(sims[run.spec.label], scales(leave_out=run.spec.label))
        fidelity.append(
            {
                "label": run.spec.label,
                "held_out": len(sims) > 1,
                "measured_tokens_per_s": s["tokens_per_s"],
                "model_tokens_per_s": tps,
                "measured_j_per_token": s["energy_j_per_token"],
                "model_j_per_token": jpt,
                "simulated_rounds_time_s": sims[run.spec.label]["time_s"],
                "measured_rounds_time_s": meas[run.spec.label]["time_s"],
            }
        )
    rows = []
    for cap in k_caps:
        sim = replay(traces, RoundModel(model.costs, replace(model.ch, max_draft=cap)), None)
        tps, jpt = calibrated(sim, (scale_t, scale_e))
        rows.append(
            {
                "label": f"oracle K≤{cap}",
                "policy": "oracle",
                "k_cap": cap,
                "simulated": sim,
                "tokens_per_s": tps,
                "energy_j_per_token": jpt,
                "mean_draft_len": sim["mean_draft_len"],
                "acceptance": sim["acceptance"],
                "rounds": sim["rounds"],
                "tokens": sim["tokens"],
            }
        )
    return {
        "rows": rows,
        "fitted_costs": fitted,
        "overheads_per_question": over,
        "scale_rounds_time": scale_t,
        "scale_rounds_energy": scale_e,
        "fidelity": fidelity,
        "traces": nq,
    }
