"""docker/smoke.sh for real: base image, both images, compose up, a device container whose greedy
output equals a local run token for token, SIGTERM, compose down (Podman; minutes, root, network to
Debian's and PyPI's mirrors). Opt in with GELATO_CONTAINER_SMOKE=1; the README records the last run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "docker" / "smoke.sh"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GELATO_CONTAINER_SMOKE") != "1",
    reason="container smoke test: set GELATO_CONTAINER_SMOKE=1 to build and run the images with Podman",
)
def test_container_smoke() -> None:
    res = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True, timeout=3600)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "PASS", tail
    assert "container output == local output, token for token" in res.stdout, tail
    assert "edge exit status 0" in res.stdout, tail
