"""The trunk actor: embeddings, attention, norms, routers, shared experts, codec heads and the KV
cache, with the routed experts on the group's expert actors. It compiles and drives the
group's exchange graph itself (a compiled graph runs only from the process that compiled it).

Requests run one at a time (the default concurrency group has one thread): every decode step
is a chain of per-layer exchanges over one graph; batching several requests into one `generate`
call is how a trunk serves many at once. `info` runs in its own group, so health checks are
answered while a request decodes. Several trunks (e.g. one per Serve replica) each take their own expert
group for compiled graphs, or share a group over plain calls (see ExpertParallelConfig).
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch
from ray.actor import ActorHandle

from unimoe_ray.config import ModelConfig
from unimoe_ray.inference.generate import SamplingConfig, generate
from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.deploy import attach_experts
from unimoe_ray.parallel.resources import actor_options, load_device_backend
from unimoe_ray.parallel.weights import build_trunk
from unimoe_ray.text.prompt import Prompt


class TrunkWorker:
    """weights: a checkpoint folder or a `trunk_state` dict (routed experts excluded)."""

    def __init__(
        self, *, model_cfg: ModelConfig, weights: str | Path | dict[str, torch.Tensor], cfg: ExpertParallelConfig
    ) -> None:
        res = cfg.trunk_resources
        torch.set_num_threads(res.torch_threads)
        load_device_backend(res.device)
        self.model = build_trunk(model_cfg, weights, device=res.device)
        self.experts = attach_experts(self.model, cfg)

    @torch.inference_mode()
    def forward(
        self,
        input_ids_BL: torch.Tensor,
        audio_codes_BKL: torch.Tensor | None = None,
        *,
        attention_mask_BL: torch.Tensor | None = None,
        labels_BKL: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """A full-sequence (training-style) forward: codec logits, and the loss with labels."""
        out = self.model(input_ids_BL, audio_codes_BKL, attention_mask_BL=attention_mask_BL, labels_BKL=labels_BKL)
        loss = None if out.loss is None else out.loss.cpu()
        return {"codec_logits_BLKV": out.codec_logits_BLKV.cpu(), "loss": loss}

    def generate(
        self, prompts: list[Prompt], negatives: list[Prompt] | None = None, sampling: SamplingConfig = SamplingConfig()
    ) -> list[torch.Tensor]:
        """unimoe_ray.inference.generate on this trunk: one (K, T_i) code tensor per prompt."""
        return generate(self.model, prompts, negatives, sampling)

    @ray.method(concurrency_group="admin")
    def info(self) -> dict:
        """steps: model forwards so far (one per decode step); recoveries: exchanges retried;
        compiles: compiled graphs built."""
        e = self.experts
        return {
            "trunk_id": e.trunk_id,
            "exchange": e.exchange_kind,
            "steps": e.steps,
            "topology_version": e.topology.version,
            "recoveries": e.recoveries,
            "compiles": e.compiles,
        }

    def close(self) -> None:
        self.experts.close()


TrunkActor = ray.remote(concurrency_groups={"admin": 1})(TrunkWorker)


def start_trunk(
    model_cfg: ModelConfig, weights: str | Path | dict[str, torch.Tensor], cfg: ExpertParallelConfig
) -> ActorHandle:
    """A TrunkWorker actor placed by `cfg.trunk_resources`; returns once it is attached."""
    trunk = TrunkActor.options(**actor_options(cfg.trunk_resources)).remote(
        model_cfg=model_cfg, weights=weights, cfg=cfg
    )
    ray.get(trunk.info.remote())
    return trunk
