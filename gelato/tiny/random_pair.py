"""Tiny random Qwen2 models and a locally trained tokenizer, saved as real checkpoints.

Contract: `build_random_pair(out_dir)` writes Hugging Face folders `target`, `drafter_agree` and
`drafter_never` (each with the same tokenizer, trained on `synthetic_corpus`) and returns their
paths. They load through `gelato.models.load_model` like any checkpoint. Built for tests and for
GPU speed runs, where acceptance is meaningless but exactness and shapes are not:
- `target` has a padded embedding (vocab rows beyond the tokenizer, as Qwen2.5-7B has);
- `drafter_agree` is the target plus small weight noise, sliced to the tokenizer: mostly agrees;
- `drafter_never` is the target with its output rows rotated by one, so its argmax is always the
  target's argmax + 1: it never agrees under greedy decoding.
`synthetic_corpus` also provides the project's own short math word problems.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "shells"]
TEMPLATES = [
    "{a} has {x} {item}. {b} gives {a} {y} more. How many {item} does {a} have now?",
    "{a} buys {x} packs of {item} with {y} in each pack. How many {item} does {a} buy?",
    "{a} had {x} {item} and gave {y} to {b}. How many {item} are left?",
    "{a} reads {x} pages a day for {y} days. How many pages does {a} read in total?",
    "A box holds {x} {item}. {a} fills {y} boxes. How many {item} are in the boxes?",
]


def synthetic_problem(rng: random.Random) -> tuple[str, str]:
    """One short word problem the project wrote itself, and a worked answer ending in '#### N'."""
    a, b = rng.sample(NAMES, 2)
    x, y = rng.randint(2, 40), rng.randint(2, 12)
    t = rng.randrange(len(TEMPLATES))
    q = TEMPLATES[t].format(a=a, b=b, x=x, y=y, item=rng.choice(ITEMS))
    if t == 0:
        ans = f"{a} has {x} + {y} = {x + y} now.\n#### {x + y}"
    elif t == 2:
        ans = f"There are {x} - {y} = {x - y} left.\n#### {x - y}"
    else:
        ans = f"That is {x} * {y} = {x * y} in total.\n#### {x * y}"
    return q, ans


def synthetic_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Question: {q}\nAnswer:\n{a}" for q, a in (synthetic_problem(rng) for _ in range(n))]


def build_random_pair(
    out_dir: str | Path,
    *,
    vocab_size: int = 384,
    pad_rows: int = 64,
    hidden: int = 64,
    layers: int = 2,
    noise: float = 0.02,
    seed: int = 0,
) -> dict[str, Path]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gelato.models import load_tokenizer
    from gelato.tiny.tokenizer import train_tokenizer

    out = Path(out_dir)
    tok_dir = train_tokenizer(synthetic_corpus(2000, seed), vocab_size, out / "tokenizer")
    tok = load_tokenizer(tok_dir)
    n_tok = len(tok)

    def config(vocab: int) -> Qwen2Config:
        return Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )

    torch.manual_seed(seed)
    target = Qwen2ForCausalLM(config(n_tok + pad_rows)).eval()
    sliced = {k: (v[:n_tok] if v.shape[0] == n_tok + pad_rows else v) for k, v in target.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    noisy = {k: v + noise * v.std() * torch.randn(v.shape, generator=gen) for k, v in sliced.items()}
    rotated = dict(sliced)
    rotated["lm_head.weight"] = torch.roll(sliced["lm_head.weight"], shifts=1, dims=0)

    paths = {"tokenizer": tok_dir}
    for name, state in (("target", None), ("drafter_agree", noisy), ("drafter_never", rotated)):
        model = target if state is None else Qwen2ForCausalLM(config(n_tok))
        if state is not None:
            model.load_state_dict(state)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        paths[name] = out / name
    return paths
