"""A checkpoint that cannot load is one line naming what is wrong: a JSON file of a local folder
that does not parse is named (the decoder's message names no file), and a library error of many
lines (the hub's "couldn't connect ... Check your internet connection or see ...") keeps its
first. Real files: the built-in drafter copied and broken."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import transformers

from gelato.models import ModelLoadError, default_model_path, load_model


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("tokenizer_config.json", "tokenizer_config.json is not valid JSON ("),
        ("tokenizer.json", "tokenizer.json is not valid JSON ("),
        ("config.json", "It looks like the config file at "),  # transformers names this one itself
    ],
)
def test_a_malformed_json_file_of_a_checkpoint_is_named(tmp_path: Path, name: str, says: str) -> None:
    folder = tmp_path / "drafter"
    shutil.copytree(default_model_path("drafter"), folder)
    (folder / name).write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), "drafter", "float32", "cpu")
    message = str(info.value)
    assert message.startswith(f"cannot load drafter {str(folder)!r}: {says}") and name in message, message
    assert "\n" not in message


def test_a_library_error_of_many_lines_keeps_its_first(monkeypatch: pytest.MonkeyPatch) -> None:
    def from_pretrained(*_: object, **__: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError) as info:
        load_model(default_model_path("drafter"), "drafter", "float32", "cpu")
    assert str(info.value).endswith("We couldn't connect to 'https://huggingface.co' to load the files."), info.value


def test_a_multimodal_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    """`AutoModelForCausalLM` loads Gemma 3's multimodal checkpoints as
    `Gemma3ForConditionalGeneration`, whose config nests the text model's: reading
    `config.vocab_size` failed with an AttributeError ("cannot load target ...: AttributeError"),
    and the KV pool would read the same fields. A real tiny one, saved and loaded as any checkpoint."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 28, "patch_size": 14}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1)
    folder = tmp_path / "multimodal"
    shutil.copytree(default_model_path("drafter"), folder)  # its tokenizer files
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), "target", "float32", "cpu")
    message = str(info.value)
    assert message == (
        f"cannot load target {str(folder)!r}: Gemma3ForConditionalGeneration is a multimodal model (its text "
        "settings are nested); give its text-only checkpoint"
    ), message


def test_a_plain_prompt_keeps_the_tokenizers_bos(tmp_path: Path) -> None:
    """Without a chat template (`--no-chat-template`, or a base model's tokenizer that has none)
    the prompt was encoded without special tokens: a Llama or Gemma model lost its BOS, which
    degrades its text. A real tokenizer whose post-processor adds a BOS (the built-in one's, with
    one added); through a chat template the template writes its own, and nothing is added."""
    import json

    from gelato.models import encode_prompt, load_tokenizer

    folder = tmp_path / "bos"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(default_model_path("drafter")) / name, folder / name)
    spec = json.loads((folder / "tokenizer.json").read_text())
    bos = [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}]
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [*bos, a],
        "pair": [*bos, a, b],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text()) | {"bos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(folder), True)
    plain = encode_prompt(tokenizer, "Tom has 3 apples", chat_template=False)
    assert plain[0] == 0 and plain[1:] == tokenizer("Tom has 3 apples", add_special_tokens=False)["input_ids"]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert encode_prompt(tokenizer, "Tom has 3 apples") == plain[1:]  # the template's text alone
