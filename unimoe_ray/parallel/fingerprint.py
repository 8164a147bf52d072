"""What an expert group runs, in a form cheap to compare: the shape of its experts and a digest
of every routed expert's weights and of the routers that pick them.

A group records its fingerprint at launch (from its replicas, which hash what they loaded) and
`attach_experts` compares the model against it before touching the model's weights. Without
the check a model of another depth fails deep inside an actor, and one of the same shape with
other weights decodes silently wrong.

Digests hash the values as float32 (exact for bf16/fp16), so a model loaded in fp32 from a bf16
checkpoint matches a group serving that checkpoint, while changed weights never do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel.weights import dcmoe_layers, expert_state, read_tensors

_ROUTER = re.compile(r"^language_model\.layers\.(\d+)\.mlp\.gate\.weight$")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A 128-bit digest of named tensors: names, shapes and float32 values."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def router_digest(model: UniMoEAudio) -> str:
    """Digest of the DCMoE routers (`mlp.gate`), which live in the trunk: a stripped trunk
    (no expert weights of its own) is still checked against the group's checkpoint."""
    return state_digest({str(moe.layer_idx): moe.gate.weight for moe in dcmoe_layers(model)})


def checkpoint_router_digest(path: str | Path) -> str:
    """`router_digest` of a checkpoint folder (reads only the router tensors)."""
    state = read_tensors(path, lambda name: (m := _ROUTER.match(name)) and m[1])
    if not state:
        raise ValueError(f"checkpoint {path} holds no DCMoE router weights (mlp.gate): nothing to parallelise")
    return state_digest(state)


@dataclass(frozen=True)
class ExpertShape:
    """What one expert actor holds: model dim, FFN dim and its DCMoE layer indices."""

    hidden_size: int
    intermediate: int
    layers: tuple[int, ...]

    @classmethod
    def of_state(cls, state: Mapping[str, torch.Tensor]) -> ExpertShape:
        layers = sorted({int(key.split(".", 1)[0]) for key in state})
        intermediate, hidden = state[f"{layers[0]}.gate_proj.weight"].shape
        return cls(hidden_size=hidden, intermediate=intermediate, layers=tuple(layers))


@dataclass(frozen=True)
class ModelFingerprint:
    """experts: one `state_digest` per routed expert, or None for a model whose routed experts
    were stripped (only shape and routers can be checked then)."""

    shape: ExpertShape
    num_routed: int
    routers: str
    experts: tuple[str, ...] | None

    def mismatch(self, group: ModelFingerprint) -> str | None:
        """Why a model with this fingerprint cannot use `group`'s experts (None: it can)."""
        ours, theirs = self.shape, group.shape
        for what, a, b in (
            ("routed experts", self.num_routed, group.num_routed),
            ("hidden size", ours.hidden_size, theirs.hidden_size),
            ("routed-expert FFN size", ours.intermediate, theirs.intermediate),
            ("DCMoE layers", _layers(ours.layers), _layers(theirs.layers)),
        ):
            if a != b:
                return f"{what}: the model has {a}, the group {b}"
        if self.experts is not None:
            differ = [e for e, (a, b) in enumerate(zip(self.experts, group.experts)) if a != b]
            if differ:
                return (
                    f"the weights of routed expert(s) {differ} differ from the group's (another "
                    "checkpoint or fine-tune)"
                )
        if self.routers != group.routers:
            return "the router weights differ from the group's checkpoint (another checkpoint or fine-tune)"
        return None


def _layers(layers: tuple[int, ...]) -> str:
    if layers == tuple(range(layers[0], layers[0] + len(layers))):
        return f"{len(layers)} ({layers[0]}..{layers[-1]})"
    return str(list(layers))


def model_fingerprint(model: UniMoEAudio) -> ModelFingerprint:
    """The fingerprint of an in-memory model (expert digests only if its experts are real)."""
    layers = dcmoe_layers(model)
    first = layers[0].routed_experts[0].gate_proj.weight
    shape = ExpertShape(
        hidden_size=first.shape[1], intermediate=first.shape[0], layers=tuple(m.layer_idx for m in layers)
    )
    num_routed = len(layers[0].routed_experts)
    experts = None
    if not first.is_meta:
        experts = tuple(state_digest(expert_state(model, e)) for e in range(num_routed))
    return ModelFingerprint(shape=shape, num_routed=num_routed, routers=router_digest(model), experts=experts)
