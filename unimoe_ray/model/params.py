"""Parameter counts of a config, built on the meta device (nothing is materialised)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unimoe_ray.config import ModelConfig
from unimoe_ray.model.unimoe_audio import UniMoEAudio


@dataclass(frozen=True)
class ParamCounts:
    total: int
    vision: int
    routed_expert: int  # one routed expert, all layers
    num_routed: int

    def activated(self, routed_per_token: int) -> int:
        """Parameters one token touches with `routed_per_token` routed experts (0 = null only)."""
        return self.total - (self.num_routed - routed_per_token) * self.routed_expert


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    with torch.device("meta"):
        model = UniMoEAudio(cfg)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.visual.parameters()) if model.visual is not None else 0
    routed = 0
    if cfg.moe.mode != "dense":
        routed = sum(sum(p.numel() for p in layer.routed_experts[0].parameters()) for layer in model.moe_layers)
    return ParamCounts(
        total=total,
        vision=vision,
        routed_expert=routed,
        num_routed=cfg.moe.num_routed if cfg.moe.mode != "dense" else 0,
    )
