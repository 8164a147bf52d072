"""The three curriculum stages as library functions (the jobs in jobs/train_stage*.py parse
flags and call these). Each checks its inputs on the driver, prepares the initial weights,
runs `run_training` and exports the final checkpoint folder for the next stage.

    stage1(task): a dense specialist, FFN width = (routed ÷ specialists) × routed width
    stage2(specialists): integrate (unimoe_ray.train.integrate), train router + shared experts
    stage3(init): train everything, aux-loss weight decaying with the global step
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from unimoe_ray.builders import new_model
from unimoe_ray.checkpoint import load_pretrained, save_pretrained
from unimoe_ray.checkpoint_hf import init_from_qwen2_5_vl
from unimoe_ray.config import ConfigError
from unimoe_ray.data.shards import ShardPathError
from unimoe_ray.presets import get_preset
from unimoe_ray.tasks import DATA_TASKS
from unimoe_ray.text.prompts import check_tokenizer, config_for_tokenizer
from unimoe_ray.text.tokenizer import load_tokenizer
from unimoe_ray.train.config import FLAG_HELP, MOE_FLAGS, TrainConfig, TrainConfigError, stage_config
from unimoe_ray.train.integrate import IntegrationError, check_compatible, integrated_model, specialist_config
from unimoe_ray.train.run import InputError, RunSpec, export_model, run_training
from unimoe_ray.train.state import META, check_model_folder, read_meta

ALL_TASKS = DATA_TASKS


@dataclass(kw_only=True)
class Common:
    """The data, the outputs and the workers: what every stage takes besides its TrainConfig."""

    shards: list[str]
    tokenizer: str
    storage_path: str
    num_workers: int = 1
    use_gpu: bool = False
    npu: bool = False
    cpus_per_worker: float = 1.0
    num_to_keep: int = 2
    max_failures: int = 1

    def spec(self, *, init: str, train: TrainConfig, name: str, meta: dict) -> RunSpec:
        resources = {"CPU": self.cpus_per_worker}
        if self.npu:
            resources["NPU"] = 1  # Ascend: one NPU per worker (hccl backend)
        return RunSpec(
            shards=self.shards,
            tokenizer=self.tokenizer,
            init=init,
            train=train,
            name=name,
            storage_path=self.storage_path,
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=resources,
            num_to_keep=self.num_to_keep,
            max_failures=self.max_failures,
            meta=meta,
        )


def add_common_args(p: argparse.ArgumentParser, stage: str) -> None:
    """The flags every stage job takes: where the data and outputs are, the workers, and one flag
    per TrainConfig field in FLAG_HELP (add_train_args)."""
    p.add_argument("--shards", nargs="+", required=True, help="shard files or folders from jobs/preprocess.py")
    p.add_argument("--tokenizer", required=True, help="the tokenizer folder used by jobs/preprocess.py")
    p.add_argument("--out", required=True, help="folder for the final model (the next stage's input)")
    p.add_argument("--storage-path", default="outputs/train", help="Ray Train storage (checkpoints, logs)")
    p.add_argument("--name", default=None, help="run name; re-running with the same name resumes")
    p.add_argument("--num-workers", type=int, default=Common.num_workers)
    p.add_argument("--cpus-per-worker", type=float, default=Common.cpus_per_worker)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--npu", action="store_true", help="one Ascend NPU per worker (resource 'NPU'), hccl")
    p.add_argument("--num-to-keep", type=int, default=Common.num_to_keep, help="checkpoints kept (the newest)")
    p.add_argument(
        "--max-failures",
        type=int,
        default=Common.max_failures,
        help="worker-group restarts (from the last checkpoint) before the run fails",
    )
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON, e.g. configs/zero2.json")
    add_train_args(p, stage)


def train_flags(stage: str) -> tuple[str, ...]:
    """The TrainConfig fields the jobs of `stage` take as flags."""
    stage_config(stage)  # an unknown stage: TrainConfigError naming the stages
    return tuple(name for name in FLAG_HELP if stage != "stage1" or name not in MOE_FLAGS)


def add_train_args(p: argparse.ArgumentParser, stage: str) -> None:
    """One flag per TrainConfig field of train_flags(stage), typed by the field's annotation and
    defaulting to the stage's value (stage_config(stage))."""
    defaults = stage_config(stage)
    hints = typing.get_type_hints(TrainConfig)
    for name in train_flags(stage):
        text = FLAG_HELP[name] + " (default: %(default)s)"
        p.add_argument(
            "--" + name.replace("_", "-"), default=getattr(defaults, name), help=text, **_flag_kwargs(name, hints[name])
        )


def _flag_kwargs(name: str, hint) -> dict:
    """argparse's type/choices/nargs for a field's annotation."""
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": list(typing.get_args(hint))}
    if typing.get_origin(hint) is tuple and Ellipsis not in typing.get_args(hint):
        (item, *rest) = typing.get_args(hint)
        if all(t is item for t in rest) and item in (int, float, str):
            return {"type": item, "nargs": 1 + len(rest), "metavar": name.upper()}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(
        f"TrainConfig.{name}: no flag for a field of type {hint}; give it an int, float, str, Literal or "
        "fixed tuple type, or list it in NO_FLAG (unimoe_ray/train/config.py) with the reason"
    )


def common_from_args(args: argparse.Namespace) -> Common:
    return Common(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Common)})


def train_config_from_args(stage: str, args: argparse.Namespace) -> TrainConfig:
    """The stage's TrainConfig with the parsed flags of add_common_args(p, stage) (and the
    --deepspeed JSON) applied."""
    ds = None
    if args.deepspeed:
        path = Path(args.deepspeed)
        if not path.is_file():
            raise InputError(f"--deepspeed {path}: no such file (see configs/zero2.json, configs/zero3.json)")
        ds = json.loads(path.read_text())
    values = {name: getattr(args, name) for name in train_flags(stage)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # nargs: lists
    return stage_config(stage, deepspeed_config=ds, **values)


def _finish(result, out: str | Path) -> Path:
    if result.error is not None:
        raise result.error
    path = export_model(result, out)
    print(f"[unimoe train] final model: {path} (metrics: {_summary(result.metrics)})")
    return path


def _summary(metrics: dict) -> dict:
    keys = ("step", "loss", "ce", "aux_loss", "skipped_steps")
    out = {k: metrics[k] for k in keys if k in metrics}
    out.update({k: v for k, v in metrics.items() if k.startswith("val/")})
    return out


def stage1(
    common: Common,
    *,
    task: str,
    preset: str,
    train: TrainConfig,
    out: str,
    name: str,
    num_specialists: int = 4,
    init_from: str | None = None,
) -> Path:
    """Train one dense specialist on one task, from random initial weights or, with
    `init_from`, from a local Qwen2.5-VL folder (unimoe_ray.checkpoint_hf: embeddings,
    attention, norms, MLP → specialist FFN, vision tower; every specialist the same)."""
    if task not in ALL_TASKS:
        raise InputError(f"--task {task!r}: use one of {', '.join(ALL_TASKS)}")
    tok = load_tokenizer(common.tokenizer)
    cfg = specialist_config(config_for_tokenizer(get_preset(preset), tok), num_specialists)
    init = Path(common.storage_path) / name / "init"
    if not (init / "config.json").is_file():
        model = new_model(cfg, tok, seed=train.seed)
        if init_from is not None:
            print(f"[unimoe train] {task}: {init_from_qwen2_5_vl(model, init_from).summary()}")
        save_pretrained(model, init)
    meta = {"task": task, "preset": preset, "num_specialists": num_specialists}
    if init_from is not None:
        meta["init_from"] = str(Path(init_from).resolve())
    result = run_training(common.spec(init=str(init), train=train.replace(tasks=(task,)), name=name, meta=meta))
    return _finish(result, Path(out))


def stage2(
    common: Common,
    *,
    specialists: list[str],
    train: TrainConfig,
    out: str,
    name: str,
    tasks: tuple[str, ...] = ALL_TASKS,
) -> Path:
    """Integrate the specialists into a DCMoE model and warm up its router + shared experts."""
    by_task: dict[str, str] = {}
    cfgs = {}
    for path in specialists:
        cfgs[path] = check_model_folder(path, "specialist")
        task = read_meta(path).get("task")
        if task is None:
            raise InputError(
                f"specialist {path} has no task in its {META}: pass stage-1 outputs (jobs/train_stage1.py --out)"
            )
        if task not in tasks:
            raise InputError(
                f"specialist {path} was trained for {task!r}, which is not one of this stage's tasks {list(tasks)}"
            )
        if task in by_task:
            raise InputError(
                f"specialists {by_task[task]} and {path} were both trained for {task!r}: pass one "
                f"specialist per task ({', '.join(tasks)})"
            )
        by_task[task] = path
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise InputError(f"no specialist for task(s) {missing}: pass one stage-1 output per task ({', '.join(tasks)})")
    check_compatible(cfgs)
    spec_cfg = next(iter(cfgs.values()))
    check_tokenizer(spec_cfg, load_tokenizer(common.tokenizer))
    ordered = [t for t in ALL_TASKS if t in by_task]
    model = integrated_model(
        {t: load_pretrained(by_task[t], dtype=torch.float32).state_dict() for t in ordered},
        spec_cfg,
        seed=train.seed,
        vision_task="v2m",
    )
    init = Path(common.storage_path) / name / "init"
    save_pretrained(model, init)
    meta = {"specialists": {t: str(Path(by_task[t]).resolve()) for t in ordered}, "expert_order": ordered}
    (init / META).write_text(json.dumps({"stage": "stage2-init", **meta}, indent=2) + "\n")
    result = run_training(common.spec(init=str(init), train=train.replace(tasks=tuple(ordered)), name=name, meta=meta))
    return _finish(result, Path(out))


def stage3(
    common: Common, *, init: str, train: TrainConfig, out: str, name: str, tasks: tuple[str, ...] = ALL_TASKS
) -> Path:
    """Joint training of everything from the stage-2 model."""
    cfg = check_model_folder(init, "--init")
    if cfg.moe.mode == "dense":
        raise InputError(
            f"--init {init} is a dense model (a stage-1 specialist?): stage 3 starts from the "
            "stage-2 output (jobs/train_stage2.py --out)"
        )
    check_tokenizer(cfg, load_tokenizer(common.tokenizer))
    meta = {"init": str(Path(init).resolve())}
    result = run_training(common.spec(init=init, train=train.replace(tasks=tasks), name=name, meta=meta))
    return _finish(result, Path(out))


def run_job(main) -> None:
    """Run a stage job's main(): input errors print one clear line (exit 2), a failed run the
    workers' error (exit 1), never a traceback wall for a user mistake."""
    import sys

    try:
        main()
    except (InputError, ShardPathError, IntegrationError, TrainConfigError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # Ray Train's TrainingFailedError carries the worker's exception
        if type(err).__name__ not in ("TrainingFailedError", "WorkerGroupError", "NonFiniteLossError"):
            raise
        print(f"error: training failed: {err}", file=sys.stderr)
        sys.exit(1)
