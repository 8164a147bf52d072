"""The Ray Train train function shared by the three stages (run on every TorchTrainer worker).

build model → resume from `ray.train.get_checkpoint()` → iterate this worker's dataset shard
(token-capped batches, replayed exactly on resume) → `train_step` (torch only) →
`ray.train.report` every step (rank 0's checkpoint every N steps) and validation every M.

Data: each worker reads its own fixed, contiguous slice of the training rows (dataset
`train_{rank}`, cut by unimoe_ray.train.run.worker_shards); each worker's batch sequence is then a pure function of its slice and the seed
(unimoe_ray.train.batches), so a checkpoint only has to record how many micro-batches were
consumed — the same number on every worker — to resume without skipping or repeating a sample.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.model.expert_parallel import make_groups, shard_experts
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.text.tokenizer import load_tokenizer
from unimoe_ray.train.batches import DataPosition, ExampleBuilder, batch_stream, collate, pack_by_tokens
from unimoe_ray.train.config import TrainConfig
from unimoe_ray.train.expert_parallel import (
    ExpertParallelBackend,
    exchange_metrics,
    optimizer_order,
    restore_optimizer,
    save_sharded_checkpoint,
)
from unimoe_ray.train.integrate import apply_trainable
from unimoe_ray.train.optim import DeepSpeedBackend, TorchBackend
from unimoe_ray.train.state import load_train_state, read_meta, save_model_and_meta, save_train_state
from unimoe_ray.train.step import LossModule, evaluate, train_step


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for `max_bad_steps` steps in a row."""


def _rows(iterator, window: int):
    """Consecutive windows of row dicts from a DataIterator, in dataset order."""
    for table in iterator.iter_batches(batch_size=window, batch_format="pyarrow", prefetch_batches=1):
        yield table.to_pylist()


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "auto" and device.type == "npu":
        return torch.bfloat16
    # CPU: bf16 autocast is emulated on CPUs without AVX512-BF16/AMX (slower), so fp32 unless asked.
    return None


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _peak_rss_mb(world: int) -> float:
    """The largest peak resident memory over the workers (MiB)."""
    import resource

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train_loop(config: dict) -> None:
    """The TorchTrainer train function. `config`: train (TrainConfig), init (model folder),
    tokenizer (folder), run_dir (metrics/TensorBoard), meta (dict recorded in checkpoints),
    step_callback (optional `f(step=, rank=, run_dir=)`, called after each step)."""
    tc: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed * 1000 + rank)

    resume = ray.train.get_checkpoint()
    state, meta = None, {}
    if resume is not None:
        d = Path(resume.to_directory())  # a local copy (storage may be remote)
        model = load_pretrained(d, dtype=torch.float32)
        state = load_train_state(d)
        meta = read_meta(d)
    else:
        model = load_pretrained(config["init"], dtype=torch.float32)
    model.train()
    apply_trainable(model, tc.trainable)
    model.lm_head.weight.requires_grad_(False)  # no text loss: the text head is not trained
    cfg = model.cfg
    ep_groups, full_order = None, []
    if tc.expert_parallel > 1:
        # The unsharded optimizer order: what a plain checkpoint's optimizer state refers to.
        full_order = optimizer_order(LossModule(model), tc.weight_decay) if state is not None else []
        ep_groups = make_groups(tc.expert_parallel)
        shard_experts(model, ep_groups)  # this rank keeps 1/N of each layer's routed experts
    lm = LossModule(model).to(device)

    if tc.deepspeed_config:
        backend = DeepSpeedBackend(lm, tc, tc.deepspeed_config, world)
        if state is not None:
            backend.engine.load_checkpoint(str(d / "deepspeed"), tag="state", load_module_strict=True)
    elif ep_groups is not None:
        # No DDP: experts and replicated parameters reduce over different groups (in step()).
        backend = ExpertParallelBackend(lm, tc, ep_groups)
        if state is not None:
            restore_optimizer(backend, state["backend"], d, full_order)
    else:
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Unused parameters are normal here: the vision tower without video rows, routed
            # experts that got no token.
            wrapped = DistributedDataParallel(lm, find_unused_parameters=True)
        else:
            wrapped = lm
        backend = TorchBackend(wrapped, tc)
        if state is not None:
            restore_optimizer(backend, state["backend"], d, full_order)  # any EP size's checkpoint

    step = int(meta.get("step", 0))
    start = int(meta.get("data_consumed", 0))
    if state is not None:
        if int(meta.get("world_size", world)) != world:
            print(
                f"[unimoe train] checkpoint was written by {meta.get('world_size')} workers, now "
                f"{world}: the data order cannot be replayed; starting the data stream afresh"
            )
            start = 0
        else:
            torch.set_rng_state(state["rng"][rank])

    tok = load_tokenizer(config["tokenizer"])
    build = ExampleBuilder(PromptBuilder(tok, cfg), cfg)
    position = DataPosition(consumed=start)
    train_shard = ray.train.get_dataset_shard(f"train_{rank}")
    stream = batch_stream(
        lambda: _rows(train_shard, tc.shuffle_window),
        build,
        max_tokens=tc.max_tokens,
        seed=tc.seed,
        rank=rank,
        start=start,
        position=position,
    )
    val_batches = []
    if tc.val_every > 0:
        val_rows = [r for w in _rows(ray.train.get_dataset_shard("val"), 256) for r in w]
        by_task: dict[str, list] = {}
        for r in sorted(val_rows, key=lambda r: r["sample_id"]):
            by_task.setdefault(r["task"], []).append(build(r))
        for task in sorted(by_task):
            val_batches += [collate(b, cfg) for b in pack_by_tokens(by_task[task], tc.max_tokens)]

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    autocast_dtype = _autocast_dtype(tc.precision, device)
    uses_aux = tc.use_aux_loss and cfg.moe.mode != "dense"
    bad_in_a_row, skipped_total = 0, int(meta.get("skipped_steps", 0))
    callback = config.get("step_callback")

    while step < tc.max_steps:
        micro = [collate(next(stream), cfg) for _ in range(tc.grad_accum)]
        aux_weight = cfg.moe.aux_weight(step) if uses_aux else 0.0
        t0 = time.perf_counter()
        res = train_step(backend, micro, aux_weight=aux_weight, autocast_dtype=autocast_dtype, device=device)
        seconds = time.perf_counter() - t0
        if tc.log_samples:
            _append_jsonl(
                run_dir / f"samples_rank{rank}.jsonl",
                {
                    "step": step + (0 if res.skipped else 1),
                    "skipped": res.skipped,
                    "consumed": position.consumed,
                    "sample_ids": [b.sample_ids for b in micro],
                },
            )
        if res.skipped:
            if not getattr(backend, "skips_bad_steps", True):
                raise NonFiniteLossError(f"non-finite loss at step {step + 1} ({res.cause}) with DeepSpeed: stopping")
            bad_in_a_row += 1
            skipped_total += 1
            if bad_in_a_row >= tc.max_bad_steps:
                raise NonFiniteLossError(
                    f"the loss was non-finite for {bad_in_a_row} steps in a row (up to step "
                    f"{step + 1}, data position {position.consumed}): {res.cause}. Lower the "
                    "learning rate (--lr), check the input shards, or resume from an earlier checkpoint"
                )
            metrics = {"step": step, "skipped_steps": skipped_total, "skipped": 1, "cause": res.cause}
        else:
            bad_in_a_row = 0
            step += 1
            metrics = {
                "step": step,
                "loss": res.loss,
                "ce": res.ce,
                "aux_loss": res.aux,
                "aux_weighted": res.aux * res.aux_weight,
                "aux_weight": res.aux_weight,
                "lr": backend.lr,
                "grad_norm": res.grad_norm,
                "tokens": res.tokens,
                "tokens_per_s": res.tokens / max(seconds, 1e-9),
                "skipped_steps": skipped_total,
                "skipped": 0,
                "epoch": position.epoch,
                "data_consumed": position.consumed,
            }
            metrics.update({f"ce/codebook{k}": v for k, v in enumerate(res.codec_ce_K)})
            metrics["peak_rss_mb"] = _peak_rss_mb(world)
            if res.routing is not None:
                metrics.update(res.routing.metrics())
            if ep_groups is not None:
                metrics.update(exchange_metrics(model, ep_groups))  # a collective: every rank
        if tc.val_every > 0 and val_batches and not res.skipped and (step % tc.val_every == 0 or step == tc.max_steps):
            val = evaluate(model, val_batches, autocast_dtype=autocast_dtype, device=device)
            metrics.update({f"val/{t}": v for t, v in val.items()})

        is_checkpoint_step = not res.skipped and (step % tc.checkpoint_every == 0 or step == tc.max_steps)
        checkpoint_dir = None
        if is_checkpoint_step:
            checkpoint_dir = _save_checkpoint(backend, model, tc, config, step, position, skipped_total, rank, world)
        if rank == 0:
            _append_jsonl(run_dir / "metrics.jsonl", {**metrics, "pid": os.getpid(), "time": time.time()})
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(k, v, step)
        # Every worker reports at the same steps (report is a barrier); rank 0 (every rank with
        # DeepSpeed) attaches its checkpoint folder.
        if is_checkpoint_step or step % tc.log_every == 0 or res.skipped:
            ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
            ray.train.report(metrics, checkpoint=ckpt)
        if callback is not None:
            callback(step=step, rank=rank, run_dir=str(run_dir))
    if writer is not None:
        writer.close()


def _save_checkpoint(
    backend,
    model,
    tc: TrainConfig,
    config: dict,
    step: int,
    position: DataPosition,
    skipped: int,
    rank: int,
    world: int,
) -> str | None:
    """Rank 0 writes the model folder + train state; with DeepSpeed every rank also writes its
    optimizer shard (Ray merges the workers' folders into one checkpoint)."""
    rngs = _gather(torch.get_rng_state(), world)
    path = Path(tempfile.mkdtemp(prefix=f"unimoe_ckpt_{step:06d}_"))
    is_ds = isinstance(backend, DeepSpeedBackend)
    full_state = None
    if is_ds and backend.zero_stage == 3:
        full_state = backend.engine._zero3_consolidated_16bit_state_dict()  # collective
    if is_ds:
        backend.engine.save_checkpoint(str(path / "deepspeed"), tag="state")
    meta = {
        **config.get("meta", {}),
        "stage": tc.stage,
        "tasks": list(tc.tasks),
        "step": step,
        "data_consumed": position.consumed,
        "epoch": position.epoch,
        "world_size": world,
        "seed": tc.seed,
        "skipped_steps": skipped,
        "max_steps": tc.max_steps,
    }
    if isinstance(backend, ExpertParallelBackend):  # every expert-holding rank writes its part
        return save_sharded_checkpoint(backend, model, path, meta=meta, rngs=rngs)
    if rank != 0:
        return str(path) if is_ds else None
    if full_state is not None:  # ZeRO-3: this rank's model holds only its partition
        from unimoe_ray.model.unimoe_audio import UniMoEAudio

        model = UniMoEAudio(model.cfg)
        model.load_state_dict({k.removeprefix("model."): v.float() for k, v in full_state.items()})
    save_model_and_meta(model, path, meta)
    save_train_state(path, {"backend": {} if is_ds else backend.state_dict(), "rng": rngs})
    return str(path)
