"""Splitting a model's weights between the trunk and the routed-expert actors.

An expert actor holds one routed expert index for every DCMoE layer; its state uses the keys
``"{layer}.{gate_proj|up_proj|down_proj}.weight"``. The trunk holds everything else. Both halves
come either from an in-memory model or from a checkpoint folder, where only the needed
tensors are read (safetensors opens lazily), so no process ever loads the other half.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

# to_memory_layout: the checkpoint's on-disk tensor layouts (the 4-D patch embedding), in one place.
from unimoe_ray.checkpoint import shard_files, to_memory_layout, to_memory_name
from unimoe_ray.config import ModelConfig
from unimoe_ray.model.moe import DCMoE
from unimoe_ray.model.unimoe_audio import UniMoEAudio

_ROUTED = re.compile(r"^language_model\.layers\.(\d+)\.mlp\.routed_experts\.(\d+)\.(.+)$")


def dcmoe_layers(model: UniMoEAudio) -> list[DCMoE]:
    layers = [m for m in model.moe_layers if isinstance(m, DCMoE)]
    if not layers:
        raise ValueError("the model has no DCMoE layers (moe.mode='dense'): nothing to parallelise")
    return layers


def expert_state(model: UniMoEAudio, expert_idx: int) -> dict[str, torch.Tensor]:
    """One routed expert's weights across all DCMoE layers."""
    return {
        f"{moe.layer_idx}.{name}": t.detach()
        for moe in dcmoe_layers(model)
        for name, t in moe.routed_experts[expert_idx].state_dict().items()
    }


def trunk_state(model: UniMoEAudio) -> dict[str, torch.Tensor]:
    """Every tensor except the routed experts' (in-memory names)."""
    return {k: v.detach() for k, v in model.state_dict().items() if not _ROUTED.match(k)}


def read_tensors(path: str | Path, keep) -> dict[str, torch.Tensor]:
    """Tensors whose in-memory name `keep(name)` maps to a key (None: skip), read lazily."""
    out: dict[str, torch.Tensor] = {}
    for f in shard_files(path):
        with safe_open(f, framework="pt") as shard:
            for disk_name in shard.keys():
                key = keep(to_memory_name(disk_name))
                if key is not None:
                    out[key] = shard.get_tensor(disk_name)
    return out


def load_expert_state(path: str | Path, expert_idx: int) -> dict[str, torch.Tensor]:
    """`expert_state` read from a checkpoint folder."""

    def keep(name: str) -> str | None:
        m = _ROUTED.match(name)
        return f"{m[1]}.{m[3]}" if m and int(m[2]) == expert_idx else None

    state = read_tensors(path, keep)
    if not state:
        raise ValueError(f"checkpoint {path} holds no weights of routed expert {expert_idx}")
    return state


def load_trunk_state(path: str | Path) -> dict[str, torch.Tensor]:
    """`trunk_state` read from a checkpoint folder."""
    return read_tensors(path, lambda name: None if _ROUTED.match(name) else name)


class NoLocalExperts:
    """The expert backend of a stripped model until Ray experts are attached: it raises, since
    computing with meta weights would not (a CPU input times a meta weight yields garbage)."""

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts) -> torch.Tensor:
        raise RuntimeError(
            f"layer {layer_idx}: this model's routed experts live in Ray actors; attach them "
            "(unimoe_ray.parallel.attach_experts) before running it"
        )


def strip_routed_experts(model: UniMoEAudio) -> None:
    """Free the routed experts' memory (parameters to the meta device) and make any use of them
    before an expert backend is attached fail loudly."""
    for moe in dcmoe_layers(model):
        moe.routed_experts.to("meta")
        moe.expert_backend = NoLocalExperts()


def build_trunk(cfg: ModelConfig, weights: str | Path | dict[str, torch.Tensor], device: str = "cpu") -> UniMoEAudio:
    """The model without routed-expert weights, ready to have an expert backend attached.

    `weights`: a checkpoint folder or a `trunk_state` dict. The model is built on `device`
    directly: once stripped, its meta experts could not be moved with `.to()`.
    """
    state = load_trunk_state(weights) if isinstance(weights, (str, Path)) else weights
    with torch.device(device):
        model = UniMoEAudio(cfg)
    strip_routed_experts(model)
    own = trunk_state(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"trunk weights do not match the model config: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    state = {k: to_memory_layout(k, v, own[k].shape).to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False)
    return model.eval()
