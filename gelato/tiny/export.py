"""Ship a trained tiny pair: copy DIR/target and DIR/drafter into the package as float16.

Contract: `python -m gelato.tiny.export DIR` writes `gelato/tiny/assets/{target,drafter}` (config,
float16 safetensors, tokenizer) and `assets/training.json`. float16 halves the files; the loader
upcasts to the requested dtype (float32 on CPU), and the README's quality figures are measured on
the exported files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from gelato.models import load_tokenizer

    if not (args.src / "training.json").is_file():
        p.error(f"{args.src}: no training.json (give the folder gelato.tiny.train wrote)")
    # Both roles loaded before anything is replaced: a wrong folder leaves the shipped pair as it was.
    pair = {}
    for role in ("target", "drafter"):
        try:
            model = AutoModelForCausalLM.from_pretrained(args.src / role, dtype=torch.float32)
            pair[role] = (model, load_tokenizer(args.src / role))
        except (OSError, ValueError) as exc:
            p.error(f"cannot load {args.src / role}: {exc}")
    for role, (model, tokenizer) in pair.items():
        dst = ASSETS / role
        shutil.rmtree(dst, ignore_errors=True)
        model.to(torch.float16).save_pretrained(dst)  # type: ignore[arg-type]
        tokenizer.save_pretrained(dst)
        print(f"{role}: {sum(f.stat().st_size for f in dst.iterdir()) / 1e6:.2f} MB in {dst}")
    shutil.copy(args.src / "training.json", ASSETS / "training.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
