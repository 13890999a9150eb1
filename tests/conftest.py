"""Shared fixtures: a tiny random Qwen2 pair built once per run, and real edge processes.

The models and tokenizer are written to a temp folder and loaded through the real loading path
(`gelato.models.load_model`), exactly as hub or local checkpoints are.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# One torch thread per process, this one included: the fastest on small CPUs, keeps parallel
# processes fair, and in-process references run as the one-thread edges do. Set before torch is
# imported (below), which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The caller's GELATO_DEVICE_* / GELATO_EDGE_* settings would reach every edge and device the tests
# start (they inherit this environment): the tests set the ones they test themselves.
for _name in [n for n in os.environ if n.startswith(("GELATO_DEVICE_", "GELATO_EDGE_"))]:
    del os.environ[_name]

import pytest  # noqa: E402
import torch  # noqa: E402

from gelato.benchmarks.procs import Edge  # noqa: E402
from gelato.models import LoadedModel, load_model  # noqa: E402
from gelato.tiny.random_pair import build_random_pair, synthetic_corpus  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def target_greedy(target: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy continuation (`generate`, its own cache; the model's padding logits
    past the tokenizer's length suppressed, as GELATO slices them off), eos included: the reference
    a greedy run must equal, not merely another run through the same session code."""
    out = target.model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        suppress_tokens=list(range(target.vocab_size, target.model.config.vocab_size)),
        eos_token_id=list(target.eos_token_ids),
        pad_token_id=target.tokenizer.eos_token_id,
    )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_random_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def target(pair: dict[str, Path]) -> LoadedModel:
    """The tiny random target, loaded as the edge loads it."""
    return load_model(str(pair["target"]), "target", "float32", "cpu")


@pytest.fixture(scope="module")
def drafter_model(pair: dict[str, Path]) -> LoadedModel:
    """The drafter that mostly agrees with `target`."""
    return load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """20 prompts of different lengths, from the project's own synthetic problems."""
    texts = [t.split("\nAnswer:")[0].removeprefix("Question: ") for t in synthetic_corpus(20, seed=7)]
    return [t[: 20 + 9 * i] for i, t in enumerate(texts)]


class EdgeProcess(Edge):
    """A real `gelato-edge` process on one torch thread (see `gelato.benchmarks.procs.Edge`), with
    the test's whole environment: tests of the `GELATO_EDGE_*` variables set them for it."""

    def __init__(self, args: list[str], timeout_s: float = 120.0) -> None:
        super().__init__(["--threads", "1", *args], timeout_s, env=dict(os.environ))


@pytest.fixture(scope="session")
def edge(pair: dict[str, Path]) -> Iterator[EdgeProcess]:
    proc = EdgeProcess(["--target", str(pair["target"])])
    yield proc
    proc.stop()


def run_device(args: list[str], timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
