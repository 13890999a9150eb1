"""Sequence-level distillation of the tiny drafter toward the tiny target (part of the recipe).

Contract: `python -m gelato.tiny.distill --out DIR` (DIR from `gelato.tiny.train`) lets the target
answer every training question greedily (batched `generate` over prompts of equal length), writes the answers to
`DIR/target_answers.jsonl` (outside the project), then continues training `DIR/drafter` on
prompt + target answer + eos for `--steps` optimizer steps and saves it back. Greedy acceptance is
the drafter agreeing with the target's argmax on the target's own continuations, so this is the
data that objective wants; held-out loss is still reported on the original held-out split.

With `--kd W` the loss is (1 - W) * cross-entropy + W * KL(target || drafter) per token, the
target's full next-token distribution computed on the same window (token-level distillation on
the target's own outputs, as DistillSpec recommends for speculative decoding).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from gelato.tiny.tokenizer import EOS_TOKEN, format_prompt
from gelato.tiny.train import gsm8k_file, heldout_loss, positive_int


def target_answers(out: Path, questions: list[str], batch: int, max_new: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    from gelato.models import load_tokenizer

    cache = out / "target_answers.jsonl"
    if cache.exists():
        return [json.loads(line)["answer"] for line in cache.read_text().splitlines()]
    tok = load_tokenizer(out / "target")
    model = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    # Batches of prompts of one exact length: no padding at all. (Left-padded batches are NOT the
    # target's own greedy output in transformers 5.x, whose Qwen2 derives positions as
    # arange + past length for every row; a drafter distilled on them loses acceptance.)
    prompts = [tok(format_prompt(q), add_special_tokens=False)["input_ids"] for q in questions]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    answers = [""] * len(questions)
    done, t0 = 0, time.time()
    for idx in by_len.values():
        for j in range(0, len(idx), batch):
            rows = idx[j : j + batch]
            ids = torch.tensor([prompts[i] for i in rows])
            with torch.inference_mode():
                gen = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
            for i, text in zip(rows, tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True), strict=True):
                answers[i] = text
            done += len(rows)
        print(f"[distill] answered {done}/{len(questions)} in {time.time() - t0:.0f}s", flush=True)
    cache.write_text("".join(json.dumps({"answer": a}) + "\n" for a in answers))
    return answers


def distill_loss(model, teacher, ids, kd: float):  # type: ignore[no-untyped-def]
    """(1 - kd) * next-token cross-entropy + kd * KL(teacher || model), both per token."""
    import torch
    import torch.nn.functional as F

    out = model(input_ids=ids, labels=ids.clone())
    if teacher is None or kd == 0.0:
        return out.loss
    with torch.no_grad():
        log_p = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1)
    log_q = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
    kl = F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True, reduction="batchmean")
    return (1 - kd) * out.loss + kd * kl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gsm8k", type=Path, default=None)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--mix", type=float, default=0.5, help="fraction of windows from the original answers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--heldout", type=positive_int, default=200, help="documents kept out of training (>= 1)")
    p.add_argument("--kd", type=float, default=0.7, help="weight of KL(target || drafter) in the loss")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from gelato.models import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recs = [json.loads(line) for line in gsm8k_file("train", args.gsm8k).read_text().splitlines()]
    random.Random(args.seed).shuffle(recs)  # the same split as gelato.tiny.train
    train, held = recs[: -args.heldout], recs[-args.heldout :]
    answers = target_answers(args.out, [r["question"] for r in train], args.gen_batch, args.max_new_tokens)
    tok = load_tokenizer(args.out / "drafter")
    docs = [format_prompt(r["question"]) + a.strip() + EOS_TOKEN for r, a in zip(train, answers, strict=True)]
    orig = [format_prompt(r["question"]) + r["answer"].strip() + EOS_TOKEN for r in train]

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.tensor([i for d in texts for i in tok(d, add_special_tokens=False)["input_ids"]])

    # Target answers keep the drafter close to the target's argmax; the original answers keep it
    # from overfitting 600k tokens of them (distilling on target answers alone lowered acceptance).
    streams = [encode(docs), encode(orig)]
    held_docs = [format_prompt(r["question"]) + r["answer"].strip() + EOS_TOKEN for r in held]
    heldout = torch.tensor([i for d in held_docs for i in tok(d, add_special_tokens=False)["input_ids"]])

    model = AutoModelForCausalLM.from_pretrained(args.out / "drafter", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.out / "target", dtype=torch.float32).eval() if args.kd else None
    print(f"[distill] drafter held-out loss before {heldout_loss(model, heldout, args.seq_len):.3f}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 2)
    span, t0 = args.seq_len + 1, time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:  # 5% warmup, then linear decay to 10%
            warm = min(1.0, (step + 1) / max(1, args.steps // 20))
            group["lr"] = args.lr * warm * (1 - 0.9 * step / args.steps)
        picks = (torch.rand(args.batch, generator=gen) < args.mix).long().tolist()
        batch = torch.stack(
            [
                streams[k][s : s + span]
                for k in picks
                for s in torch.randint(0, len(streams[k]) - span, (1,), generator=gen).tolist()
            ]
        )
        loss = distill_loss(model, teacher, batch[:, :-1], args.kd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"[distill] step {step + 1}/{args.steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    held_loss = heldout_loss(model, heldout, args.seq_len)
    print(f"[distill] drafter held-out loss after {held_loss:.3f}", flush=True)
    model.eval()
    model.save_pretrained(args.out / "drafter")
    record_path = args.out / "training.json"
    record = json.loads(record_path.read_text())
    record["drafter_distill"] = {
        "steps": args.steps,
        "lr": args.lr,
        "train_s": round(time.time() - t0, 1),
        "heldout_loss": round(held_loss, 4),
        "mix_original": args.mix,
        "kd_weight": args.kd,
        "target_answers_max_new_tokens": args.max_new_tokens,
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
