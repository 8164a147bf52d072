"""Expert-parallel training on top of unimoe_ray.model.expert_parallel: the update backend
(group-aware gradient reduction instead of DDP), checkpoints written by every rank that holds
experts, optimizer state keyed by parameter name (so it follows each expert to whichever rank
holds it after a resume with another EP size), and the per-rank exchange statistics.
Torch only (torch.distributed); train/loop.py calls it.

A sharded checkpoint folder is the released layout, whole: config.json, one or more
`model-XXXXX-of-YYYYY.safetensors` per expert-holding rank (rank 0's also hold the replicated
tensors) and `model.safetensors.index.json`, so `load_pretrained` and the expert actors open it
as any other. Beside it, for resuming:

    train_state.pt                          scheduler, RNG states, optimizer state of the
                                            replicated parameters (by name)
    optimizer-experts-XXXXX-of-GGGGG.pt     optimizer state of one EP rank's experts (by name)
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from unimoe_ray.checkpoint import INDEX_FILE, to_disk
from unimoe_ray.config_hf import save_config
from unimoe_ray.model.expert_parallel import (
    ExpertParallelGroups,
    clip_grad_norm,
    is_expert_param,
    reduce_gradients,
    take_exchange_stats,
)
from unimoe_ray.train.config import TrainConfig
from unimoe_ray.train.optim import TorchBackend, param_groups
from unimoe_ray.train.state import META, save_train_state

EXPERT_OPTIM_GLOB = "optimizer-experts-*-of-*.pt"
NAMED = "named"  # format tag of a name-keyed optimizer state


class ExpertParallelBackend(TorchBackend):
    """AdamW + schedule on a model sharded by `shard_experts` (no DDP wrapper): after the
    window's backward the gradients are reduced by group (`reduce_gradients`: replicated ones
    over all ranks, experts over their EDP group), then clipped by the whole model's norm."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, groups: ExpertParallelGroups) -> None:
        super().__init__(model, cfg)
        self.groups = groups
        self.named_params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def context(self, last: bool):
        return contextlib.nullcontext()  # nothing to hold back: reduction happens in step()

    def reduce(self) -> None:
        reduce_gradients(self.named_params, self.groups)

    def step(self) -> float:
        self.reduce()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = clip_grad_norm(self.named_params, max_norm, self.groups)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


# ---- optimizer state by parameter name ----


def backend_param_names(backend: TorchBackend) -> list[str]:
    """The optimizer's parameters' names, in its flat order (the keys of its state_dict)."""
    names = {id(p): n for n, p in backend.module.named_parameters()}
    return [names[id(p)] for p in backend.params]


def optimizer_order(module: nn.Module, weight_decay: float) -> list[str]:
    """The names, in optimizer order, that a TorchBackend over the unsharded `module` uses:
    what the integer keys of a plain (DDP) checkpoint's optimizer state refer to."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in param_groups(module, weight_decay) for p in g["params"]]


def named_state(backend: TorchBackend) -> dict:
    """{"format": "named", "state": {name: AdamW state}, "param_groups": hyper-parameters per
    group (no parameter lists), "scheduler": ...}."""
    sd = backend.optimizer.state_dict()
    names = backend_param_names(backend)
    return {
        "format": NAMED,
        "state": {names[i]: s for i, s in sd["state"].items()},
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]],
        "scheduler": backend.scheduler.state_dict(),
    }


def legacy_to_named(state: dict, order: list[str]) -> dict:
    """A TorchBackend.state_dict() (integer keys, unsharded model) in the named form."""
    opt = state["optimizer"]
    return {
        "format": NAMED,
        "state": {order[i]: s for i, s in opt["state"].items()},
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "scheduler": state["scheduler"],
    }


def load_named_state(backend: TorchBackend, named: dict, expert_states: dict[str, dict]) -> None:
    """Restore a named optimizer state into this backend's optimizer, whatever the EP size it
    was saved at: each parameter takes the state saved under its name (`expert_states` adds the
    experts'). A parameter without saved state had never been stepped (no gradient yet)."""
    names = backend_param_names(backend)
    saved = {**named["state"], **expert_states}
    current = backend.optimizer.state_dict()
    if len(named["param_groups"]) != len(current["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer has {len(named['param_groups'])} parameter groups, this "
            f"run's {len(current['param_groups'])}: resume with the same stage (trainable set)"
        )
    backend.optimizer.load_state_dict(
        {
            "state": {i: saved[n] for i, n in enumerate(names) if n in saved},
            "param_groups": [
                {**g, "params": c["params"]} for g, c in zip(named["param_groups"], current["param_groups"])
            ],
        }
    )
    backend.scheduler.load_state_dict(named["scheduler"])


def restore_optimizer(backend: TorchBackend, state: dict, checkpoint: Path, order: list[str]) -> None:
    """Resume the optimizer from a checkpoint of any EP size into `backend` (plain, DDP or
    expert-parallel). `order`: `optimizer_order` of the unsharded model, for plain checkpoints."""
    if state.get("format") != NAMED:
        if not isinstance(backend, ExpertParallelBackend):
            backend.load_state_dict(state)  # plain → plain: as always
            return
        state = legacy_to_named(state, order)
    mine = set(backend_param_names(backend))
    expert_states: dict[str, dict] = {}
    files = sorted(checkpoint.glob(EXPERT_OPTIM_GLOB))
    expected = int(state.get("expert_files", len(files)))
    if len(files) != expected:
        raise FileNotFoundError(
            f"{checkpoint}: {len(files)} of the {expected} expert optimizer files "
            f"({EXPERT_OPTIM_GLOB}) are there; the checkpoint is incomplete"
        )
    for f in files:
        part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        expert_states.update({n: s for n, s in part["state"].items() if n in mine})
    load_named_state(backend, state, expert_states)


# ---- checkpoints ----


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if parts[-1] and size + nbytes > max_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = t
        size += nbytes
    return [p for p in parts if p]


def save_sharded_checkpoint(
    backend: ExpertParallelBackend,
    model: nn.Module,
    path: Path,
    *,
    meta: dict,
    rngs: list,
    max_shard_bytes: int = 2 * 1024**3,
) -> str | None:
    """Write this rank's part of a checkpoint folder (a collective: every rank calls it).

    The first EP block (ranks 0..G-1) holds every expert once: each of its ranks writes its
    experts' shard file(s) and their optimizer state; rank 0 also the replicated tensors, the
    index, config.json, the training record and train_state.pt. Returns the folder for ranks
    that wrote into it (Ray Train merges the workers' folders into one checkpoint), else None.
    """
    import json

    groups = backend.groups
    rank, W, G = groups.rank, groups.world_size, groups.ep_size
    writes = rank < G
    tensors = {}
    if writes:
        tensors = {n: t for n, t in model.state_dict().items() if is_expert_param(n) or rank == 0}
    parts = _split(to_disk(tensors), max_shard_bytes)
    counts = _gather_objects(len(parts), W)
    offset, total = sum(counts[:rank]), sum(counts)
    weight_map, nbytes = {}, 0
    path.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        fname = f"model-{offset + i + 1:05d}-of-{total:05d}.safetensors"
        save_file(part, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        nbytes += sum(t.numel() * t.element_size() for t in part.values())
    maps = _gather_objects((weight_map, nbytes), W)
    named = named_state(backend)
    if writes:
        experts = {n: s for n, s in named["state"].items() if is_expert_param(n)}
        torch.save({"state": experts}, path / f"optimizer-experts-{rank + 1:05d}-of-{G:05d}.pt")
    if rank != 0:
        return str(path) if writes else None
    index = {
        "metadata": {"total_size": sum(b for _, b in maps)},
        "weight_map": {k: v for m, _ in maps for k, v in sorted(m.items())},
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    save_config(model.cfg, path / "config.json")
    (path / META).write_text(json.dumps({**meta, "expert_parallel": G}, indent=2, sort_keys=True) + "\n")
    named["state"] = {n: s for n, s in named["state"].items() if not is_expert_param(n)}
    named["expert_files"] = G
    save_train_state(path, {"backend": named, "rng": rngs})
    return str(path)


# ---- routing statistics of the exchange ----


def exchange_metrics(model: nn.Module, groups: ExpertParallelGroups) -> dict[str, float]:
    """Per-rank exchange counts of the step (a collective; every rank gets all ranks' numbers):

    ep/rank{r}/sent_e{e}: routed assignments of rank r's tokens to expert e (Σ layers);
    ep/rank{r}/sent_remote: those that left the rank (the all_to_all traffic);
    ep/rank{r}/received_e{e}: assignments expert e received on rank r (its experts only);
    ep/rank{r}/received: all assignments rank r's experts computed;
    ep/rank{r}/exchange_s: wall seconds of rank r's exchanges (forward + backward, waiting
    for the group's slowest rank included);
    ep/L{y}/imbalance, ep/imbalance: the busiest rank's received assignments over the mean of
    its EP group (1.0: balanced; the exchange waits for the busiest), worst group, per layer
    and over all layers.
    """
    sent_YE, received_YE, seconds = take_exchange_stats(model)
    device = next(model.parameters()).device  # nccl/hccl gather device tensors only
    mine = torch.stack([sent_YE, received_YE]).double().to(device)
    seconds_1 = torch.tensor([seconds], dtype=torch.float64, device=device)
    if groups.world_size > 1:
        every = [torch.zeros_like(mine) for _ in range(groups.world_size)]
        dist.all_gather(every, mine)
        every_s = [torch.zeros_like(seconds_1) for _ in range(groups.world_size)]
        dist.all_gather(every_s, seconds_1)
    else:
        every, every_s = [mine], [seconds_1]
    all_W2YE = torch.stack(every).cpu()
    W, _, Y, E = all_W2YE.shape
    G, L = groups.ep_size, E // groups.ep_size
    out: dict[str, float] = {}
    for r in range(W):
        sent_E, received_E = all_W2YE[r, 0].sum(0), all_W2YE[r, 1].sum(0)
        own = range((r % G) * L, (r % G + 1) * L)
        for e in range(E):
            out[f"ep/rank{r}/sent_e{e}"] = float(sent_E[e])
        out[f"ep/rank{r}/sent_remote"] = float(sent_E.sum() - sent_E[list(own)].sum())
        for e in own:
            out[f"ep/rank{r}/received_e{e}"] = float(received_E[e])
        out[f"ep/rank{r}/received"] = float(received_E.sum())
        out[f"ep/rank{r}/exchange_s"] = float(every_s[r].cpu())
    received_WY = all_W2YE[:, 1].sum(-1)  # per rank and layer
    blocks_BGY = received_WY.view(W // G, G, Y)

    def imbalance(load_BG: torch.Tensor) -> float:
        mean_B = load_BG.mean(1)
        ratio_B = torch.where(mean_B > 0, load_BG.amax(1) / mean_B.clamp_min(1e-12), torch.ones_like(mean_B))
        return float(ratio_B.max())

    for y in range(Y):
        out[f"ep/L{y}/imbalance"] = imbalance(blocks_BGY[:, :, y])
    out["ep/imbalance"] = imbalance(blocks_BGY.sum(-1))
    return out
