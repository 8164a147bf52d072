"""Driver side of a training stage: check the inputs (clear errors before any worker starts),
build the Ray datasets (shards → task filter → train / per-task validation split), and run the
TorchTrainer with resume, checkpoint retention and failure retries.

Re-running with the same `name` and `storage_path` resumes from that run's latest checkpoint
(Ray Train restores its checkpoint manager from storage); a worker that dies mid-run is
replaced and the run continues from the last checkpoint (`max_failures`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from unimoe_ray.data.shards import shard_paths
from unimoe_ray.train.batches import split_rows
from unimoe_ray.train.config import TrainConfig
from unimoe_ray.train.loop import train_loop
from unimoe_ray.train.optim import check_zero3
from unimoe_ray.train.state import check_model_folder


class InputError(ValueError):
    """Bad stage input (shards, checkpoints, flags); the message names the cause and the fix."""


# Ray Train's controller takes one `ray.train.report` per poll of its workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a worker's result queue holds one report,
# so a worker that reports again before the next poll waits for it. The loop reports every
# `log_every` steps (default: each step), and a step shorter than the interval would wait out
# the rest of it (measured: 1.96 s per report at the default). The driver sets a shorter poll
# unless the user chose one; Ray passes the variable on to the controller and the workers.
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.25"


def set_report_poll() -> str:
    """The controller's poll interval this run uses (the user's, else REPORT_POLL_S)."""
    return os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)


@dataclass(kw_only=True)
class RunSpec:
    """One stage run: data, initial weights, training config and the Ray Train settings."""

    shards: list[str]
    tokenizer: str
    init: str  # model folder (save_pretrained layout) to start from
    train: TrainConfig
    name: str
    storage_path: str
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict = field(default_factory=lambda: {"CPU": 1})
    num_to_keep: int = 2
    max_failures: int = 1
    meta: dict = field(default_factory=dict)  # recorded in every checkpoint (e.g. the task)
    step_callback: Callable | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path) / self.name / "logs"


def check_tasks(counts: dict[str, int], train: TrainConfig, shards: list[str]) -> None:
    missing = [t for t in train.tasks if counts.get(t, 0) == 0]
    if missing:
        raise InputError(
            f"the shards hold no rows of task(s) {missing} that {train.stage} needs (they hold "
            f"{dict(sorted(counts.items()))}; shards: {shards[:3]}{'…' if len(shards) > 3 else ''}). "
            "Preprocess data for those tasks or train on fewer tasks (--tasks)"
        )


def plan_data(spec: RunSpec) -> tuple[list[str], dict[str, int], set[str]]:
    """Shard files, rows per task and the validation ids (whole source clips, `split_rows`),
    checked before Ray starts (reads only the sample_id, source_id and task columns)."""
    import pyarrow.dataset as pads

    paths = shard_paths(spec.shards)
    try:
        index = pads.dataset(paths, format="parquet").to_table(columns=["sample_id", "source_id", "task"]).to_pylist()
    except Exception as err:  # noqa: BLE001 (pyarrow raises several types)
        raise InputError(
            f"cannot read the shards' sample_id/source_id/task columns ({err}): are they outputs of jobs/preprocess.py?"
        ) from None
    counts, val_ids = split_rows(index, spec.train)
    check_tasks(counts, spec.train, paths)
    n_train = sum(counts[t] for t in spec.train.tasks) - len(val_ids)
    if n_train < spec.num_workers:
        raise InputError(
            f"{n_train} training rows for {spec.num_workers} workers: some worker would get an "
            "empty shard. Use fewer workers (--num-workers) or more data"
        )
    return paths, counts, val_ids


def build_datasets(paths: list[str], tasks: set[str], val_ids: set[str], *, with_val: bool = True):
    """(train, val) Ray datasets, materialised in a fixed order; val is None without
    `with_val` (no validation: the shards are not read a second time for it)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same rows in the same order every run
    ds = ray.data.read_parquet(paths).filter(lambda r: r["task"] in tasks)
    train_ds = ds.filter(lambda r: r["sample_id"] not in val_ids).materialize()
    val_ds = ds.filter(lambda r: r["sample_id"] in val_ids).materialize() if with_val else None
    return train_ds, val_ds


def worker_shards(train_ds, num_workers: int) -> dict:
    """Deterministic dataset shards: contiguous, near-equal slices of the materialised rows,
    one per worker rank (`train_{rank}`; Ray Data's streaming split hands blocks to whichever
    worker asks first, which differs between runs and would break exact resume). Everything
    is read and cut here, on the driver, before the workers take the cluster's CPUs."""
    n = train_ds.count()
    cuts = [n * i // num_workers for i in range(1, num_workers)]
    parts = train_ds.split_at_indices(cuts) if cuts else [train_ds]
    return {f"train_{i}": p for i, p in enumerate(parts)}


def process_group_backend(spec: RunSpec) -> str:
    """gloo on CPU, nccl with GPUs, hccl with Ascend NPUs (a custom `NPU` resource per worker)."""
    if spec.use_gpu:
        return "nccl"
    if "NPU" in spec.resources_per_worker:
        return "hccl"
    return "gloo"


def run_training(spec: RunSpec):
    """Run (or resume) one stage; returns Ray Train's Result. Raises InputError early."""
    init_cfg = check_model_folder(spec.init, "initial weights")
    spec.train.check_expert_parallel(
        num_workers=spec.num_workers, num_routed=None if init_cfg.moe.mode == "dense" else init_cfg.moe.num_routed
    )
    ds = spec.train.deepspeed_config
    if ds and int(ds.get("zero_optimization", {}).get("stage", 0)) == 3:
        try:
            check_zero3(spec.train)
        except ValueError as err:
            raise InputError(str(err)) from None
    if not Path(spec.tokenizer).is_dir():
        raise InputError(f"tokenizer folder {spec.tokenizer} does not exist: pass the one used by jobs/preprocess.py")
    paths, counts, val_ids = plan_data(spec)
    n_val = len(val_ids)
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins that cluster; without it, an embedded
        # local Ray. "local", not None: None would join whatever cluster `ray start` last
        # recorded in /tmp/ray/ray_current_cluster on this machine.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    with_val = spec.train.val_every > 0
    train_ds, val_ds = build_datasets(paths, set(spec.train.tasks), val_ids, with_val=with_val)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "data.json").write_text(
        json.dumps({"rows": counts, "val_rows": n_val, "tasks": list(spec.train.tasks)}) + "\n"
    )
    backend = process_group_backend(spec)
    datasets = worker_shards(train_ds, spec.num_workers)
    if with_val:
        datasets["val"] = val_ds
    set_report_poll()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "train": spec.train,
            "init": str(Path(spec.init).resolve()),
            "tokenizer": str(Path(spec.tokenizer).resolve()),
            "run_dir": str(spec.run_dir),
            "meta": spec.meta,
            "step_callback": spec.step_callback,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.use_gpu, resources_per_worker=spec.resources_per_worker
        ),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(
            name=spec.name,
            storage_path=str(Path(spec.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.num_to_keep),
            failure_config=FailureConfig(max_failures=spec.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()


def export_model(result, out: str | Path) -> Path:
    """Copy the final checkpoint folder (model + training state) to `out` for the next stage."""
    if result.checkpoint is None:
        raise RuntimeError("the run produced no checkpoint")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    src = result.checkpoint.to_directory()
    shutil.copytree(src, out)
    return out
