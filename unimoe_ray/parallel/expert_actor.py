"""The routed-expert actor: one expert index's SwiGLU weights for every DCMoE layer.

Grouping by expert index (not by layer) makes "scale expert 3" one actor type with N replicas,
and keeps an actor's memory at 1/num_routed of the routed weights whatever the depth. The
per-layer exchange then reaches every expert actor once per layer; the layer index travels in
the payload, so one compiled graph serves all layers.

The constructor rebuilds all state from its arguments (an object ref owned by the controller,
or a checkpoint folder), so Ray's `max_restarts` brings a killed replica back with its weights.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn

from unimoe_ray.model.experts import SwiGLU
from unimoe_ray.model.hugepages import move_to_hugepages
from unimoe_ray.parallel.fingerprint import ExpertShape, state_digest
from unimoe_ray.parallel.resources import Device, load_device_backend
from unimoe_ray.parallel.weights import load_expert_state
from unimoe_ray.parallel.wire import READONLY_WARNING, ExpertCall, decode_call, encode_reply


class ExpertWorker:
    """Runs `SwiGLU_layer(x)` for the layers of one routed expert.

    state: ``{"{layer}.{proj}.weight": tensor}`` (see unimoe_ray.parallel.weights) or a
    checkpoint folder to read it from. device: "cpu", "cuda" or "npu".
    """

    def __init__(
        self, *, expert_idx: int, state: dict[str, torch.Tensor] | str, device: Device = "cpu", threads: int = 1
    ) -> None:
        torch.set_num_threads(threads)
        warnings.filterwarnings("ignore", message=READONLY_WARNING)
        load_device_backend(device)
        if isinstance(state, (str, Path)):
            state = load_expert_state(state, expert_idx)
        self.expert_idx = expert_idx
        self.device = torch.device(device)
        # What this replica serves, for the group's fingerprint (see fingerprint.py).
        self.shape = ExpertShape.of_state(state)
        self.digest = state_digest(state)
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            layer, name = key.split(".", 1)
            by_layer.setdefault(layer, {})[name] = t
        self.layers = nn.ModuleDict()
        for layer, w in by_layer.items():
            hidden, dim = w["gate_proj.weight"].shape
            mlp = SwiGLU(dim=dim, hidden=hidden).to(w["gate_proj.weight"].dtype)
            mlp.load_state_dict(w)
            self.layers[str(layer)] = mlp
        self.layers.to(self.device).eval()
        move_to_hugepages(self.layers)  # CPU weights in 2 MiB pages (fewer TLB misses per call)

    def call(self, msg: bytes | ExpertCall | None) -> bytes | np.ndarray | None:
        """One exchange (a message from `wire.encode_call`): the expert's output rows for its
        input rows, same dtype. None (this replica got no tokens in this layer) returns at
        once: idle experts cost no compute."""
        if msg is None:
            return None
        layer_idx, x_nD = decode_call(msg)
        mlp = self.layers[str(layer_idx)]
        weight_dtype = mlp.gate_proj.weight.dtype
        with torch.inference_mode():
            y_nD = mlp(x_nD.to(self.device, weight_dtype)).to(x_nD.dtype)
        return encode_reply(y_nD, inband=isinstance(msg, bytes))

    def info(self) -> dict:
        """Where this replica runs (also the liveness probe: it answers once (re)started)."""
        ctx = ray.get_runtime_context()
        return {
            "expert": self.expert_idx,
            "actor_id": ctx.get_actor_id(),
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "layers": sorted(int(k) for k in self.layers),
            "shape": self.shape,
            "digest": self.digest,
        }
