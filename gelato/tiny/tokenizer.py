"""Byte-level BPE tokenizers for the tiny Qwen2 models, saved in the Hugging Face format.

Contract: `train_tokenizer(texts, vocab_size, out_dir)` writes a folder that
`gelato.models.load_tokenizer(out_dir)` loads, with `<|endoftext|>` as eos/pad and a
chat template that renders one user turn in the project's fixed prompt format
(`PROMPT_TEMPLATE`). The same code builds the shipped tokenizer (on GSM8K train) and the test
tokenizers (on a corpus the tests write themselves), so both load through the real path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
# The fixed prompt format of the embedded default (README "Prompt format"). The answer follows
# on the next line and ends with eos, exactly as in training.
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "Question: {{ message['content'] }}\nAnswer:\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}" + EOS_TOKEN + "{% endif %}"
    "{% endfor %}"
)


def format_prompt(question: str) -> str:
    """The prompt the tiny models were trained on, for one question."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out
