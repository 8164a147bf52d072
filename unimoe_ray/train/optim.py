"""Optimiser, schedule and the two update backends (plain torch / DDP, and DeepSpeed ZeRO).
Torch only; no Ray.

A backend owns the optimiser step for one accumulation window: `context(last)` wraps a
micro-batch's forward + backward (DDP skips the gradient all-reduce until the last one),
`backward(loss)`, then `step()` (clip, optimiser, schedule) → grad norm, or `skip()`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from unimoe_ray.train.config import TrainConfig


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """lr multiplier: linear warm-up 0 → 1 over `warmup` steps, then cosine 1 → min_ratio at
    `total` (and min_ratio after it)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on norms, biases and embeddings (1-D or tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check the stage's freezing rule")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters + cosine schedule with warm-up (docs/DESIGN.md §2)."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=cfg.min_lr_ratio)
    )
    return opt, sched


class TorchBackend:
    """AdamW + schedule on a plain module or a DistributedDataParallel wrapper of it."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.model = model  # what forward is called on (maybe DDP)
        self.module = getattr(model, "module", model)
        self.cfg = cfg
        self.optimizer, self.scheduler = build_optimizer(self.module, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def context(self, last: bool):
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def check_zero3(cfg: TrainConfig) -> None:
    """ZeRO-3 gathers each module's parameters collectively when the module runs, so every
    rank must run the same modules in the same order. The vision tower runs only for video
    rows, which some ranks have and others not in the same step."""
    if "v2m" in cfg.tasks:
        raise ValueError(
            "DeepSpeed ZeRO-3 cannot train the v2m task here: the vision tower runs only on "
            "workers whose batch holds video, and ZeRO-3's per-module parameter gathers would "
            "then differ between workers (a collective mismatch). Use ZeRO-2 "
            "(configs/zero2.json) or train without v2m (--tasks)"
        )


class DeepSpeedBackend:
    """DeepSpeed ZeRO engine (initialised inside the train function, after the process group).

    The JSON config gives the ZeRO stage; this backend fills in what must agree with the loop:
    micro-batch size 1 (our batches are token-capped, DeepSpeed only counts them), the
    accumulation steps, clipping, and our AdamW + cosine schedule as client optimiser and
    scheduler (DeepSpeed's fused CPU Adam would need compiled ops). A non-finite loss is not
    skipped here: DeepSpeed's step cannot be cancelled after backward, so the run stops.
    """

    skips_bad_steps = False

    def __init__(self, model: nn.Module, cfg: TrainConfig, ds_config: dict, world_size: int) -> None:
        import deepspeed

        ds = dict(ds_config)
        ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_batch_size"] = cfg.grad_accum * world_size
        ds["gradient_clipping"] = cfg.grad_clip
        ds.setdefault("zero_allow_untested_optimizer", True)
        for key in ("optimizer", "scheduler", "fp16"):
            if key in ds:
                raise ValueError(
                    f"DeepSpeed config has {key!r}: remove it; the trainer passes its own AdamW + "
                    "cosine schedule (flags --lr/--warmup-steps) and trains in fp32/bf16"
                )
        stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        if stage == 3:
            check_zero3(cfg)
            from deepspeed.utils import set_z3_leaf_modules

            from unimoe_ray.model.moe import DCMoE

            # A DCMoE block runs only the experts its tokens picked; as a ZeRO-3 "leaf" it
            # gathers all its parameters on entry, so every rank fetches the same ones.
            set_z3_leaf_modules(model, [DCMoE])
        opt, sched = build_optimizer(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=opt,
            lr_scheduler=sched,
            config=ds,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        self.model = self.engine
        self.module = self.engine.module
        self.cfg = cfg
        self.zero_stage = stage

    def context(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already normalised over the whole accumulation window.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed steps the optimiser only at the window boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip(self) -> None:
        """Nothing to undo (backward was not called for the bad micro-batch); the loop stops
        the run because `skips_bad_steps` is False."""

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]
