"""The KV pool is made on the model thread when the server starts serving its target, not on the
event loop at the first open (it reads the model's parameters and, for a model accelerate placed,
walks its modules: a stall of every stream once)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from gelato.edge import sessions as sessions_module
from gelato.edge.config import EdgeConfig
from gelato.edge.server import EdgeServer
from gelato.types import SamplingParams


def test_the_pool_is_made_on_the_model_thread(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    made_on: list[str] = []
    real = sessions_module.KVPool

    def recording(*args: Any, **kwargs: Any) -> Any:
        made_on.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions_module, "KVPool", recording)

    async def scenario() -> None:
        server = EdgeServer(EdgeConfig(port=0))
        await server.start()
        try:
            loaded = await server.load(str(pair["target"]), "float32", "cpu")
            registry = server.service.registry
            assert registry.pool is not None  # before any session opened
            registry.admit(loaded, SamplingParams(), [5, 6, 7], 4)  # as an open does, on the event loop
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    assert len(made_on) == 1 and made_on[0].startswith("target"), made_on
