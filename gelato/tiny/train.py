"""Reproducible recipe for the embedded default pair (tokenizer, target, drafter).

Contract: `python -m gelato.tiny.train --out DIR` reads GSM8K's train split from `--gsm8k`
(default `$GELATO_GSM8K_DIR/train.jsonl`, else `../shared/data/gsm8k/train.jsonl`), never copies
it, and writes `DIR/tokenizer`, `DIR/target` and `DIR/drafter` as ordinary Hugging Face folders
(config + safetensors + tokenizer). The budget is a number of optimizer steps, not wall-clock, so
the result does not depend on the machine's speed; every random choice derives from `--seed`.

Training text is the fixed prompt format followed by the worked answer and eos (see
`tokenizer.format_prompt`). Documents are packed into a token stream and cut into random windows
(standard LM pretraining); the last `--heldout` documents are kept out for the held-out loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gelato.cli_common import positive_int
from gelato.tiny.tokenizer import EOS_TOKEN, format_prompt, train_tokenizer


@dataclass(frozen=True)
class Shape:
    """A Qwen2 shape: hidden size, layers, heads, kv heads, MLP width."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SHAPES = {
    "target": Shape(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=576),
    "drafter": Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384),
}


def default_gsm8k_path(split: str) -> Path:
    """GSM8K JSONL path: `$GELATO_GSM8K_DIR/<split>.jsonl`, else ../shared/data/gsm8k."""
    root = os.environ.get("GELATO_GSM8K_DIR")
    if root:
        return Path(root) / f"{split}.jsonl"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / f"{split}.jsonl"


def gsm8k_file(split: str, given: Path | None = None) -> Path:
    """The GSM8K JSONL to read: `given` (a --gsm8k/--data flag), else the default above. A missing
    file stops the program with one line saying where it looked and how to point at the data."""
    path = given or default_gsm8k_path(split)
    if not path.is_file():
        raise SystemExit(
            f"error: GSM8K {split} split not found at {path}; pass the JSONL's path (--data; --gsm8k for training) "
            f"or set GELATO_GSM8K_DIR to the folder holding {split}.jsonl"
        )
    return path


def load_documents(path: Path) -> list[str]:
    """One training document per GSM8K record: prompt, worked answer, eos."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            docs.append(format_prompt(rec["question"]) + rec["answer"].strip() + EOS_TOKEN)
    return docs


def build_model(shape: Shape, vocab_size: int, eos_id: int, seed: int):  # type: ignore[no-untyped-def]
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return Qwen2ForCausalLM(cfg)


def train_one(name: str, args: argparse.Namespace, stream, heldout, vocab_size: int, eos_id: int) -> dict:  # type: ignore[no-untyped-def]
    """Train one model for a fixed number of steps; return its training record."""
    import torch

    steps = args.target_steps if name == "target" else args.drafter_steps
    lr = args.target_lr if name == "target" else args.drafter_lr
    model = build_model(SHAPES[name], vocab_size, eos_id, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    gen = torch.Generator().manual_seed(args.seed + 1)
    span = args.seq_len + 1
    t0 = time.time()
    print(f"[{name}] {n_params / 1e6:.2f} M parameters, {steps} steps", flush=True)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - span, (args.batch,), generator=gen)
        batch = torch.stack([stream[s : s + span] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"[{name}] step {step + 1}/{steps} loss {out.loss.item():.3f} {el:.0f}s", flush=True)
    train_s = time.time() - t0
    loss = heldout_loss(model, heldout, args.seq_len)
    print(f"[{name}] held-out loss {loss:.3f} after {train_s:.0f}s", flush=True)
    model.eval()
    model.save_pretrained(Path(args.out) / name)
    tokens_seen = steps * args.batch * args.seq_len
    return {
        "params": n_params,
        "steps": steps,
        "lr": lr,
        "train_s": round(train_s, 1),
        "heldout_loss": round(loss, 4),
        "epochs": round(tokens_seen / len(stream), 2),
        "shape": SHAPES[name].__dict__,
    }


def heldout_loss(model, heldout, seq_len: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(heldout) - seq_len - 1, seq_len):
            chunk = heldout[i : i + seq_len].unsqueeze(0)
            total += model(input_ids=chunk, labels=chunk).loss.item()
            n += 1
    model.train()
    return total / max(1, n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k", type=Path, default=None, help="GSM8K train JSONL")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--target-steps", type=int, default=2400)
    p.add_argument("--drafter-steps", type=int, default=2400)
    p.add_argument("--target-lr", type=float, default=2e-3)
    p.add_argument("--drafter-lr", type=float, default=3e-3)
    p.add_argument("--heldout", type=positive_int, default=200, help="documents kept out of training (>= 1)")
    p.add_argument("--only", choices=["target", "drafter"], default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)

    import torch

    from gelato.models import load_tokenizer

    torch.set_num_threads(args.threads)
    path = gsm8k_file("train", args.gsm8k)
    if not path.exists():
        print(f"error: GSM8K train split not found at {path} (use --gsm8k or GELATO_GSM8K_DIR)", file=sys.stderr)
        return 2
    docs = load_documents(path)
    random.Random(args.seed).shuffle(docs)
    train_docs, held_docs = docs[: -args.heldout], docs[-args.heldout :]
    tok_dir = args.out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(train_docs, args.vocab_size, tok_dir)
    tok = load_tokenizer(tok_dir)
    eos_id = int(tok.eos_token_id)

    def encode(texts: list[str]) -> torch.Tensor:
        ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]
        return torch.tensor(ids, dtype=torch.long)

    stream, heldout = encode(train_docs), encode(held_docs)
    print(f"{len(train_docs)} documents, {len(stream)} tokens, vocab {len(tok)}", flush=True)
    record_path = args.out / "training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.update({"seed": args.seed, "seq_len": args.seq_len, "batch": args.batch, "vocab": len(tok)})
    for name in ["target", "drafter"] if args.only is None else [args.only]:
        record[name] = train_one(name, args, stream, heldout, len(tok), eos_id)
        tok.save_pretrained(args.out / name)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
