"""The Ray Train loop on one local Ray: a worker killed mid-run (the run resumes from the last
checkpoint and replays exactly the lost batches), DDP over 2 workers = 1 worker fed the union
of their batches, three NaN steps in a row stop the run with the cause.

The kill and the DDP tests read one 2-worker run (module fixture `killed_run`): its steps 1-4
happen before the kill, in the first worker group, and are what the DDP test compares; a
TorchTrainer run costs tens of seconds of worker start-up on 2 cores, its steps little."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from unimoe_ray.checkpoint import load_pretrained, save_pretrained
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import PromptBuilder, config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.batches import ExampleBuilder, collate
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.optim import TorchBackend
from unimoe_ray.train.run import RunSpec, run_training
from unimoe_ray.train.state import read_meta
from unimoe_ray.train.step import LossModule, train_step
from unimoe_ray.train.synthetic import write_synthetic_shards

# TorchTrainer runs (a DeepSpeed one; the module fixture's two runs): 1-4 min each under
# `make test` on a loaded 2-core machine (machines differ twofold from day to day); the suite's
# 300 s default is a hang guard, and it covers a test's fixture set-up too.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_loop")
    tok = build_test_tokenizer(root / "tok")
    # No router jitter: routing is a function of the weights and the batch (DDP comparison).
    cfg = config_for_tokenizer(get_preset("tiny"), load_tokenizer(tok)).replace(
        moe=dict(input_jitter=0.0, router_jitter=0.0)
    )
    save_pretrained(UniMoEAudio(cfg).init_weights(seed=0), root / "init")
    shards = write_synthetic_shards(root / "shards", {"tts_en": 10, "t2m": 6}, frames=(10, 40))
    rows = {r["sample_id"]: r for p in shards for r in pq.read_table(p).to_pylist()}
    return dict(root=root, tok=str(tok), cfg=cfg, init=str(root / "init"), rows=rows)


def _spec(env, name: str, *, init: str | None = None, num_workers: int = 2, **train) -> RunSpec:
    kw = dict(tasks=("tts_en", "t2m"), lr=3e-3, warmup_steps=1, max_tokens=256, val_every=0, log_samples=True)
    kw.update(train)
    return RunSpec(
        shards=[str(env["root"] / "shards")],
        tokenizer=env["tok"],
        init=init or env["init"],
        train=stage_config("stage3", **kw),
        name=name,
        storage_path=str(env["root"] / "store"),
        num_workers=num_workers,
        max_failures=1,
    )


def _records(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def killed_run(ray_local, env):
    """2 workers, 10 steps, a checkpoint every 4; rank 1 is SIGKILLed once after step 6.
    Read-only for the tests that use it."""

    def kill_rank1_once(*, step, rank, run_dir):  # nested: pickled by value for the workers
        marker = Path(run_dir) / "killed"
        if rank == 1 and step == 6 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, not an exception

    spec = _spec(env, "kill", max_steps=10, checkpoint_every=4)
    spec.step_callback = kill_rank1_once
    return spec, run_training(spec)


def test_killed_worker_resumes_from_last_checkpoint_with_the_same_batches(killed_run, env):
    spec, result = killed_run
    assert result.error is None and result.metrics["step"] == 10
    assert (spec.run_dir / "killed").exists()
    ckpt = Path(result.checkpoint.path)
    assert read_meta(ckpt)["step"] == 10 and read_meta(ckpt)["data_consumed"] == 10
    load_pretrained(ckpt, dtype=torch.float32)  # the checkpoint is a model folder

    all_rows: set[str] = set()
    for rank in (0, 1):
        recs = _records(spec.run_dir, rank)
        steps = [r["step"] for r in recs]
        restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
        first, second = recs[:restart], recs[restart:]
        assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
        assert [r["step"] for r in second] == list(range(5, 11))  # from the step-4 checkpoint
        # The lost steps 5 and 6 see exactly the batches they saw before the kill.
        assert [r["sample_ids"] for r in first[4:]] == [r["sample_ids"] for r in second[:2]]
        # Final trajectory: consecutive data positions, every epoch a permutation of the
        # worker's rows (no sample skipped or repeated).
        final = first[:4] + second
        assert [r["consumed"] for r in final] == list(range(1, 11))
        ids = [s for r in final for mb in r["sample_ids"] for s in mb]
        rank_rows = set(ids)
        seen: set[str] = set()
        for s in ids:
            assert s not in seen, f"{s} repeated within an epoch"
            seen.add(s)
            if seen == rank_rows:
                seen = set()
        assert not (rank_rows & all_rows)  # workers' shards are disjoint
        all_rows |= rank_rows
    train_rows = {sid for sid, r in env["rows"].items()}
    assert all_rows <= train_rows and len(all_rows) >= len(train_rows) - 2  # minus validation rows (none here)
    metrics = [json.loads(line) for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({m["pid"] for m in metrics}) == 2  # rank 0 was restarted too (a new worker group)
    # The aux weight follows the global step across the restart (stage-3 decay restored).
    assert all(m["aux_weight"] == pytest.approx(env["cfg"].moe.aux_weight(m["step"] - 1)) for m in metrics)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    assert list((spec.run_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard from rank 0


def test_ddp_two_workers_equal_one_worker_fed_the_union(killed_run, env):
    """Steps 1-4 of the 2-worker run (before the kill, a checkpoint at step 4), replayed in
    one process on the union of the two workers' batches (grad_accum=2)."""
    spec, result = killed_run
    assert result.error is None
    metrics = [json.loads(line) for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()][:4]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    ddp_losses = [m["loss"] for m in metrics]
    r0, r1 = _records(spec.run_dir, 0)[:4], _records(spec.run_dir, 1)[:4]
    assert [r["step"] for r in r0] == [r["step"] for r in r1] == [1, 2, 3, 4]

    cfg = env["cfg"]
    build = ExampleBuilder(PromptBuilder(load_tokenizer(env["tok"]), cfg), cfg)
    model = load_pretrained(env["init"], dtype=torch.float32).train()
    model.lm_head.weight.requires_grad_(False)
    backend = TorchBackend(LossModule(model), spec.train.replace(grad_accum=2))
    torch.manual_seed(0)
    single = []
    for a, b, m in zip(r0, r1, metrics):
        micro = [collate([build(env["rows"][s]) for s in rec["sample_ids"][0]], cfg) for rec in (a, b)]
        single.append(train_step(backend, micro, aux_weight=m["aux_weight"]).loss)
    assert len(single) == 4
    assert single == pytest.approx(ddp_losses, rel=2e-5)
    assert ddp_losses[-1] < ddp_losses[0]


def test_three_nan_steps_in_a_row_stop_the_run_with_the_cause(ray_local, env):
    model = load_pretrained(env["init"], dtype=torch.float32)
    with torch.no_grad():
        model.codec_head.weight[3, :] = float("nan")
    save_pretrained(model, env["root"] / "nan_init")
    spec = _spec(env, "nan", max_steps=10, checkpoint_every=5, init=str(env["root"] / "nan_init"), num_workers=1)
    spec.max_failures = 0
    with pytest.raises(Exception, match="non-finite for 3 steps in a row") as info:
        result = run_training(spec)
        if result.error is not None:
            raise result.error
    assert "codec cross-entropy non-finite on codebooks [0]" in str(info.value)
    metrics = [json.loads(line) for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics] == [1, 2]  # the third raises before reporting
    assert all(m["skipped"] == 1 and "codebooks [0]" in m["cause"] for m in metrics)


def test_deepspeed_zero2_on_cpu_two_workers_loss_decreases(ray_local, env):
    config = json.loads((Path(__file__).resolve().parents[2] / "configs" / "zero2.json").read_text())
    spec = _spec(env, "zero2", max_steps=5, checkpoint_every=5, deepspeed_config=config, log_samples=False)
    result = run_training(spec)
    assert result.error is None and result.metrics["step"] == 5
    losses = [json.loads(line)["loss"] for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[-1] < losses[0]
    ckpt = Path(result.checkpoint.path)
    assert (ckpt / "deepspeed" / "state").is_dir()  # DeepSpeed's optimizer shards, both ranks merged
    assert len(list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))) == 2
    model = load_pretrained(ckpt, dtype=torch.float32)
    start = load_pretrained(env["init"], dtype=torch.float32)
    assert not torch.equal(model.codec_head.weight, start.codec_head.weight)
