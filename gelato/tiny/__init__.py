"""The embedded default: a tiny Qwen2 target/drafter pair and the recipe that builds it.

Recipe (fixed seeds, budgets in optimizer steps; README "Embedded default"):
1. `python -m gelato.tiny.train --out DIR`   tokenizer (byte-level BPE, 4096) + target + drafter
2. `python -m gelato.tiny.distill --out DIR` drafter fine-tuned on the target's greedy answers
3. `python -m gelato.tiny.export DIR`        float16 copies into `gelato/tiny/assets/`

`tokenizer.py` also builds the test tokenizers; `random_pair.py` builds the tests' random models.
"""
