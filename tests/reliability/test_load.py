"""Load: 64 concurrent sessions on one real CPU `gelato-edge` — greedy with
draft lengths 0..8 and every 8th one sampling with a fixed seed, all open at once — produce
exactly their solo verdicts (the same blocks verified by an in-process `TargetSession`), twice;
after each wave the edge holds no session and no KV (`Info`), and its idle RSS after the second
wave is within `gelato.benchmarks.load.RSS_TOLERANCE_MIB` of the one after the first (the first wave
warms the allocators; glibc's mmap threshold is fixed so freed KV leaves RSS at once — see
`gelato.benchmarks.load_traffic.FIXED_MALLOC` for why and what the default allocator does).

The scenario is `gelato.benchmarks.load.load_phase`, which `python -m gelato.benchmarks.load` runs at scale.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gelato.benchmarks.load import FIXED_MALLOC, RSS_TOLERANCE_MIB, load_phase, load_specs
from gelato.models import LoadedModel
from tests.conftest import EdgeProcess

SESSIONS, WAVES = 64, 2
IDLE = {"active_sessions": 0, "kv_bytes_in_use": 0, "kv_bytes_reserved": 0, "kv_pool_bytes": 0}


def test_the_session_mix() -> None:
    specs = load_specs(SESSIONS, vocab=384)
    assert {s.k for s in specs if s.params.greedy} == set(range(9))
    sampling = [s for s in specs if not s.params.greedy]
    assert len(sampling) == SESSIONS // 8 and len({s.params.seed for s in sampling}) == len(sampling)


def test_64_sessions_equal_their_solo_runs_and_the_edge_returns_to_idle(
    pair: dict[str, Path], target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in FIXED_MALLOC.items():
        monkeypatch.setenv(name, value)  # the edge process inherits it
    edge = EdgeProcess(["--target", str(pair["target"]), "--dtype", "float32", "--max-sessions", str(SESSIONS)])
    try:
        result = asyncio.run(load_phase(edge.address, edge.proc.pid, target, SESSIONS, WAVES))
    finally:
        assert edge.stop() == 0
    assert not result["failures"], result["failures"]
    for wave in result["waves"]:
        assert wave["peak_active_sessions"] == SESSIONS  # all open at once
        assert wave["max_batch_rows"] > 1 and wave["accepted"] > 0  # really batched, drafts accepted
        assert wave["after"] == IDLE, wave
    assert result["rss_growth_after_first_wave_mib"] <= RSS_TOLERANCE_MIB, result
