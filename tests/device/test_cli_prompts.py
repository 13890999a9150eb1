"""Prompts the device cannot encode are usage errors naming where they came from, before any model
loads: a command-line `--prompt` whose bytes are not UTF-8 (Python hands it over with lone
surrogates, on which the tokenizer raised a TypeError: a traceback, and the run's later prompts
never ran), the same in a `--prompts-file` line (a `\\udce9` JSON escape), a prompts file that is
not UTF-8, missing or a folder (each named with the flag, file and line). An empty `--drafter` is
refused rather than silently loading the built-in model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gelato.device.cli import build_parser, read_prompts
from gelato.device.config import DeviceConfig


def config(*args: str) -> DeviceConfig:
    return DeviceConfig.from_args(build_parser().parse_args(list(args)))


def test_a_prompt_that_is_not_utf8_is_a_usage_error_naming_it() -> None:
    cmd = [sys.executable.encode(), b"-m", b"gelato.device.cli", b"--policy", b"ar-device", b"--meter", b"none"]
    cmd += [b"--prompt", b"fine", b"--prompt", b"caf\xe9", b"--max-new-tokens", b"2"]
    res = subprocess.run(cmd, capture_output=True, timeout=120, env={**os.environ, "PYTHONUTF8": "0"})
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 2 and "Traceback" not in err, err
    assert err.strip() == "error: --prompt (the 2nd): not valid Unicode text at character 4 (not UTF-8?)", err


def test_prompts_file_errors_name_the_flag_the_file_and_the_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"question": "b"}\n', encoding="utf-8")
    assert read_prompts(config("--prompts-file", str(good))) == ["a", "b"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "a"}\n{"prompt": "caf\\udce9"}\n', encoding="utf-8")
    cases = [
        (latin, f"--prompts-file {latin}:2: not UTF-8 text (byte 0xe9)"),
        (surrogate, f"--prompts-file {surrogate}:2: not valid Unicode text at character 4"),
        (tmp_path / "missing.jsonl", f"--prompts-file {tmp_path / 'missing.jsonl'}: No such file or directory"),
        (tmp_path, f"--prompts-file {tmp_path}: Is a directory"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as info:
            read_prompts(config("--prompts-file", str(path)))
        assert str(info.value).startswith(message), info.value


def test_an_empty_drafter_is_refused_not_the_built_in_one() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "gelato.device.cli", "--drafter", "", "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: --drafter must name a hub id or a folder"), res.stderr
