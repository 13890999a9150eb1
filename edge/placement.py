"""Where a target's decoder layers execute, so that the KV pool keeps each layer's KV there.

Contract: `layer_devices(hf_device_map, layers)` is pure: accelerate's device map (module name ->
GPU index, "cuda:N", "cpu", "disk") -> one `torch.device` per decoder layer, following accelerate's
`dispatch_model` (a module runs on its map entry's device; "cpu"/"disk" entries are offloaded
weights run on the main device). `model_kv_devices(model)` applies it to a model placed by
accelerate and returns the parameters' device for every other model. Both raise ValueError naming
the layer when a placement cannot be followed (no entry holds a layer, or one layer's parts would
run on different devices).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DeviceLike = int | str | torch.device
OFFLOADED = ("cpu", "disk")  # accelerate map values whose modules run on the main device


def as_device(where: DeviceLike) -> torch.device:
    return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)


def layer_devices(
    device_map: Mapping[str, DeviceLike], layers: int, prefix: str = "model.layers", main: DeviceLike | None = None
) -> list[torch.device]:
    """Where each decoder layer (module `{prefix}.{i}`) executes under an accelerate device map
    (`hf_device_map`: module name -> GPU index, "cuda:N", "cpu", "disk", ...). Pure. A layer runs on
    its map entry's device (itself or its closest enclosing module; "" is the whole model); "cpu"
    and "disk" are offloaded weights run on the main device `main` (default as `dispatch_model`
    picks it: the map's first other device, else "cpu"). ValueError when no entry holds a layer,
    or entries inside one layer run its parts on different devices."""
    if main is None:
        main = next((d for d in device_map.values() if d not in OFFLOADED), "cpu")
    main_device = as_device(main)

    def execution(where: DeviceLike) -> torch.device:
        return main_device if where in OFFLOADED else as_device(where)

    out = []
    for i in range(layers):
        name = f"{prefix}.{i}"
        holders = [k for k in device_map if k == "" or k == name or name.startswith(k + ".")]
        inside = {k: v for k, v in device_map.items() if k.startswith(name + ".")}
        if not holders and not inside:
            raise ValueError(f"the device map names no module holding layer {i} ({name}): {dict(device_map)}")
        parts = dict(inside)
        if holders:  # the closest enclosing entry holds whatever `inside` does not name
            closest = max(holders, key=len)
            parts[closest] = device_map[closest]
        where = {execution(v) for v in parts.values()}
        if len(where) > 1:
            placed = ", ".join(f"{k or '<model>'}: {v}" for k, v in sorted(parts.items()))
            raise ValueError(
                f"layer {i} ({name}) is split over {', '.join(sorted(map(str, where)))} ({placed}); "
                "the KV pool needs each layer to run on one device"
            )
        out.append(where.pop())
    return out


def model_kv_devices(model: Any) -> list[torch.device]:
    """Per decoder layer, where it executes. A model placed by accelerate (hooks attached,
    `hf_device_map` set): `layer_devices` on its layer list (the first ModuleList of
    `num_hidden_layers` modules) with the main device its root hook runs on; any other model runs
    where its parameters are. ValueError as `layer_devices`, or when no layer list is found."""
    layers = model.config.num_hidden_layers
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or not any(hasattr(m, "_hf_hook") for m in model.modules()):
        return [next(model.parameters()).device] * layers
    main = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return layer_devices(device_map, layers, name, main)
    raise ValueError(f"{type(model).__name__} has no list of {layers} decoder layers")
