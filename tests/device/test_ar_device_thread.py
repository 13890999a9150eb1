"""`ar-device`'s drafter forwards run on the client's drafter thread, as with an edge: they once
ran on the event loop (the default inline offload), holding up its signal handlers and tasks for
a whole block's forwards. SPEC: model forwards never run on the asyncio event loop's thread."""

from __future__ import annotations

import asyncio
import threading

from gelato.device.client import EdgeClient
from gelato.device.config import DeviceConfig
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.policy import parse_policy
from gelato.device.run import generate_one
from gelato.models import LoadedModel
from gelato.power import NullMeter


def test_ar_device_forwards_leave_the_event_loop(drafter_model: LoadedModel) -> None:
    config = DeviceConfig(prompt=["Ava has 3 apples."], policy="ar-device", max_new_tokens=20, meter="none")
    drafter = Drafter(drafter_model, config.sampling)
    threads: list[str] = []
    hook = drafter_model.model.register_forward_pre_hook(lambda *_: threads.append(threading.current_thread().name))

    async def run() -> tuple[int, str]:
        client = EdgeClient("127.0.0.1:1")  # never reached: ar-device has no edge
        try:
            acct = EnergyAccountant(NullMeter(), None)
            policy = parse_policy("ar-device", config.controller)
            res = await generate_one(config, client, drafter, policy, acct, config.prompt[0], 0, None)  # type: ignore[index]
            return len(res.token_ids), threading.current_thread().name
        finally:
            await client.close()

    try:
        tokens, loop_thread = asyncio.run(run())
    finally:
        hook.remove()
    assert tokens == 20 and threads
    assert loop_thread not in threads and all(name.startswith("drafter") for name in threads), set(threads)
