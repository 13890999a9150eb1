"""A benchmark's provenance (`gelato.benchmarks.provenance.git_output`) never fails a run: without
git on PATH (the images' slim base, an install from the wheel) or outside a checkout, the commit
and changed files are empty. `gelato-bench` asked git only after all the measuring, and crashed
there (FileNotFoundError) when it was missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gelato.benchmarks import bench_finish, policies, simulate
from gelato.benchmarks.provenance import ROOT, git_output


def test_the_commit_of_a_checkout_and_nothing_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if (ROOT / ".git").exists():
        assert len(git_output(["rev-parse", "HEAD"])) == 40
    assert git_output(["rev-parse", "HEAD"], tmp_path) == ""  # no checkout there
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_output(["rev-parse", "HEAD"]) == ""
    state = bench_finish.code_state()
    assert state["commit"] == "" and state["changed"] == [] and len(state["sources_sha256_12"]) == 12
    assert simulate.code_state()["commit"] == "" and policies.git_state() == {"commit": "", "changed": []}
