"""Training configuration: one frozen dataclass for the loop, and the three named curriculum
stages (docs/DESIGN.md §2, paper §4) as presets of it.

Stage            trains                          data                 lr     aux weight
stage1 (dense)   everything                      one task, raw        1e-4   — (no router)
stage2 (warm-up) router + shared experts only    balanced, all tasks  3e-5   moe.aux_weight(step)
stage3 (joint)   everything                      balanced, all tasks  1e-5   moe.aux_weight(step)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from unimoe_ray.tasks import DATA_TASKS

Trainable = Literal["all", "router_and_shared"]
Precision = Literal["auto", "fp32", "bf16"]


class TrainConfigError(ValueError):
    """A training option is invalid; the message names the option and the fix."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything the train function needs besides the data and the initial weights."""

    stage: str = "stage3"
    tasks: tuple[str, ...] = DATA_TASKS
    trainable: Trainable = "all"
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    max_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_tokens: int = 4096  # per micro-batch and worker, padded tokens (rows × longest row)
    shuffle_window: int = 256  # rows shuffled and length-bucketed together
    use_aux_loss: bool = True  # False: aux weight 0 (e.g. the DDP-equivalence test)
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA/NPU with bf16, fp32 on CPU
    val_every: int = 50
    val_max_rows: int = 16  # per task
    checkpoint_every: int = 50
    log_every: int = 1
    seed: int = 0
    deepspeed_config: dict | None = None
    log_samples: bool = False  # write each step's sample ids (resume / equivalence tests)
    max_bad_steps: int = 3  # consecutive non-finite losses that stop the run
    # Ranks per expert-parallel group: each holds 1/N of every layer's routed experts
    # (unimoe_ray.model.expert_parallel); must divide the workers and the routed experts.
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"lr={self.lr}: must be > 0"),
            (self.max_steps >= 1, f"max_steps={self.max_steps}: must be >= 1"),
            (0 <= self.warmup_steps, f"warmup_steps={self.warmup_steps}: must be >= 0"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum}: must be >= 1"),
            (self.max_tokens >= 16, f"max_tokens={self.max_tokens}: must be >= 16"),
            (self.grad_clip >= 0, f"grad_clip={self.grad_clip}: must be >= 0 (0 disables)"),
            (self.checkpoint_every >= 1, f"checkpoint_every={self.checkpoint_every}: must be >= 1"),
            (self.val_every >= 0, f"val_every={self.val_every}: must be >= 0 (0 disables)"),
            (
                self.trainable in ("all", "router_and_shared"),
                f"trainable={self.trainable!r}: use 'all' or 'router_and_shared'",
            ),
            (self.precision in ("auto", "fp32", "bf16"), f"precision={self.precision!r}: use 'auto', 'fp32' or 'bf16'"),
            (bool(self.tasks), "tasks is empty: name at least one of tts_zh, tts_en, t2m, v2m"),
            (self.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
            (
                self.expert_parallel >= 1,
                f"expert_parallel={self.expert_parallel}: must be >= 1 (1: no expert parallelism)",
            ),
            (
                self.expert_parallel == 1 or not self.deepspeed_config,
                f"expert_parallel={self.expert_parallel} with a DeepSpeed config: expert parallelism runs "
                "on the plain torch backend (DeepSpeed's MoE gradient handling only knows its own MoE "
                "layer); drop --deepspeed or use --expert-parallel 1",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainConfigError(msg)
        unknown = set(self.tasks) - {"tts_zh", "tts_en", "t2m", "v2m"}
        if unknown:
            raise TrainConfigError(f"unknown tasks {sorted(unknown)}: use tts_zh, tts_en, t2m, v2m")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def check_expert_parallel(self, *, num_workers: int, num_routed: int | None) -> None:
        """expert_parallel must divide the workers and the routed experts per layer (None: a
        dense model, which has none to shard)."""
        N = self.expert_parallel
        if N == 1:
            return
        if num_routed is None:
            raise TrainConfigError(
                f"expert_parallel={N}: the model is dense (a stage-1 specialist) and has no routed "
                "experts to shard; use --expert-parallel 1"
            )
        if num_workers % N or num_routed % N:
            raise TrainConfigError(
                f"expert_parallel={N} must divide both the {num_workers} workers (--num-workers) "
                f"and the {num_routed} routed experts per layer; choose a common divisor"
            )


# The stage jobs' training flags (unimoe_ray.train.stages.add_common_args), one per field a user
# sets on the command line: field → help. The flag is the field's name with dashes (max_steps →
# --max-steps); its type, choices and default (the stage's) come from the field itself.
FLAG_HELP: dict[str, str] = {
    "lr": "peak learning rate (paper §4: 1e-4 / 3e-5 / 1e-5 for stages 1 / 2 / 3)",
    "min_lr_ratio": "the cosine schedule decays to lr × this",
    "warmup_steps": "linear warm-up steps",
    "max_steps": "optimizer steps of the run",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas (two numbers)",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "grad_accum": "micro-batches per optimizer step",
    "max_tokens": "padded tokens per micro-batch and worker",
    "shuffle_window": "rows shuffled and length-bucketed together",
    "precision": "auto: bf16 autocast on CUDA/NPU with bf16, fp32 on CPU",
    "val_every": "steps between validations (0: none)",
    "val_max_rows": "validation rows per task",
    "checkpoint_every": "steps between checkpoints",
    "log_every": "steps between metric lines",
    "seed": "seed of the new weights, the data order and each rank's torch RNG",
    "max_bad_steps": "consecutive non-finite losses that stop the run",
    "expert_parallel": "ranks per expert-parallel group, N: each worker holds 1/N of every layer's routed "
    "experts, tokens travel by all_to_all; N divides --num-workers and the routed experts (1: none)",
}
# Flags of the MoE stages (2 and 3) only: stage 1 trains dense specialists, which have no routed
# experts to shard.
MOE_FLAGS = ("expert_parallel",)
# The fields without a flag, and why (tests/unit/test_train_flags.py: every field is in FLAG_HELP
# or here, so a new field cannot be forgotten).
NO_FLAG: dict[str, str] = {
    "stage": "each job is one stage (jobs/train_stage1.py, 2, 3)",
    "tasks": "each job's own --task / --tasks (stage 1 trains one specialist per task)",
    "trainable": "fixed by the stage (stage 2: router and shared experts only)",
    "use_aux_loss": "fixed by the stage (stage 1 is dense: no router, no aux loss)",
    "deepspeed_config": "read from the JSON file that --deepspeed PATH names",
    "log_samples": "a test switch (resume and equivalence tests), not a user option",
}


# Paper §4: learning rates 1e-4 / 3e-5 / 1e-5 for the three stages.
STAGES: dict[str, TrainConfig] = {
    "stage1": TrainConfig(stage="stage1", trainable="all", lr=1e-4, use_aux_loss=False),
    "stage2": TrainConfig(stage="stage2", trainable="router_and_shared", lr=3e-5),
    "stage3": TrainConfig(stage="stage3", trainable="all", lr=1e-5),
}


def stage_config(stage: str, **overrides) -> TrainConfig:
    """A curriculum stage's defaults with some fields changed (None values are ignored)."""
    if stage not in STAGES:
        raise TrainConfigError(f"unknown stage {stage!r}: use one of {sorted(STAGES)}")
    return STAGES[stage].replace(**{k: v for k, v in overrides.items() if v is not None})
