"""The embedded default: a tiny Qwen2 target/drafter pair and the recipe that builds it.

`tokenizer.py` trains the byte-level BPE tokenizer (also used by the tests on their own corpus),
`train.py` is the reproducible training recipe, and `assets/` holds the shipped checkpoints.
"""
