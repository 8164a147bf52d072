"""`expert_parallel` in the Ray Train loop (2 workers, `tiny`, jitter and aux loss on). One run at
N=2 fails after step 5 (its last checkpoint: step 4); the same run resumed at N=1 redoes step 5
and finishes step 6. Both
give the losses of one process replaying the two workers' batches (the loop's per-rank seeds
as one RNG stream per emulated rank), the N=2 part reports per-rank exchange statistics, and
its checkpoint is one released folder written by both ranks that `load_pretrained` opens. The
step-level equivalence (every gradient and parameter) is tests/unit/test_expert_parallel_train.py."""

from __future__ import annotations

import json
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
def env(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("train_ep")
    tok = build_test_tokenizer(root / "tok")
    cfg = config_for_tokenizer(get_preset("tiny"), load_tokenizer(tok))
    save_pretrained(UniMoEAudio(cfg).init_weights(seed=0), root / "init")
    shards = write_synthetic_shards(root / "shards", {"tts_en": 8, "t2m": 8}, frames=(10, 40))
    rows = {r["sample_id"]: r for p in shards for r in pq.read_table(p).to_pylist()}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield dict(root=root, tok=str(tok), cfg=cfg, rows=rows)
    ray.shutdown()


def _spec(env, *, expert_parallel: int) -> RunSpec:
    train = stage_config(
        "stage3",
        tasks=("tts_en", "t2m"),
        lr=3e-3,
        warmup_steps=1,
        max_tokens=256,
        val_every=0,
        max_steps=6,
        checkpoint_every=2,
        expert_parallel=expert_parallel,
        log_samples=True,
    )
    return RunSpec(
        shards=[str(env["root"] / "shards")],
        tokenizer=env["tok"],
        init=str(env["root"] / "init"),
        train=train,
        name="ep",
        storage_path=str(env["root"] / "store"),
        num_workers=2,
        max_failures=0,
    )


def _metrics(spec: RunSpec) -> list[dict]:
    return [json.loads(line) for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]


def _records(spec: RunSpec, rank: int) -> list[dict]:
    return [json.loads(line) for line in (spec.run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(env):
    def stop_after_5(*, step, rank, run_dir):  # nested, builtins only: pickled by value for the workers
        if step == 5:  # step 4's checkpoint was reported a step earlier
            raise RuntimeError("stopping after step 5 (test)")

    sharded = _spec(env, expert_parallel=2)
    sharded.step_callback = stop_after_5
    with pytest.raises(Exception, match="stopping after step 5") as first:
        result = run_training(sharded)
        if result.error is not None:
            raise result.error
    # The same run (name, storage) again at N=1: it resumes from N=2's step-4 checkpoint.
    resumed = _spec(env, expert_parallel=1)
    second = run_training(resumed)
    return dict(spec=resumed, first=first, second=second)


def _replay(env, spec: RunSpec, records: list[list[dict]], metrics: list[dict]) -> list[float]:
    """One process, both workers' micro-batches per step (grad_accum 2), micro-batch r drawing
    its jitter from rank r's stream: seeded as the loop seeds worker r, then advanced by
    building the model (as the worker's load_pretrained does)."""
    cfg = env["cfg"]
    streams = []
    for r in range(2):
        torch.manual_seed(spec.train.seed * 1000 + r)
        model = load_pretrained(env["root"] / "init", dtype=torch.float32)
        streams.append(torch.get_rng_state())
    model.train()
    model.lm_head.weight.requires_grad_(False)
    lm = LossModule(model)
    pos = {"r": 0}

    def enter(mod, args):
        torch.set_rng_state(streams[pos["r"]])

    def leave(mod, args, out):
        streams[pos["r"]] = torch.get_rng_state()
        pos["r"] = 1 - pos["r"]

    lm.register_forward_pre_hook(enter)
    lm.register_forward_hook(leave)
    backend = TorchBackend(lm, spec.train.replace(grad_accum=2))
    build = ExampleBuilder(PromptBuilder(load_tokenizer(env["tok"]), cfg), cfg)
    losses = []
    for recs, m in zip(zip(*records), metrics):
        micro = [collate([build(env["rows"][s]) for s in rec["sample_ids"][0]], cfg) for rec in recs]
        losses.append(train_step(backend, micro, aux_weight=m["aux_weight"]).loss)
    return losses


def test_sharded_then_resumed_unsharded_equal_one_process(runs, env):
    spec = runs["spec"]
    assert "stopping after step 5" in str(runs["first"].value)
    assert runs["second"].error is None and runs["second"].metrics["step"] == 6
    metrics = _metrics(spec)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 5, 6]  # step 5 at N=2, again at N=1
    assert ["ep/imbalance" in m for m in metrics] == [True] * 5 + [False] * 2
    records = [_records(spec, r) for r in range(2)]
    assert [r["step"] for r in records[0]] == [1, 2, 3, 4, 5, 5, 6]
    assert records[0][4]["sample_ids"] == records[0][5]["sample_ids"]  # the same batches
    final = [rs[:4] + rs[5:] for rs in records]
    expected = _replay(env, spec, final, metrics[:4] + metrics[5:])
    assert [m["loss"] for m in metrics] == pytest.approx(expected[:5] + expected[4:], rel=2e-5)
    assert expected[-1] < expected[0]


def test_sharded_steps_report_exchange_statistics(runs, env):
    E = env["cfg"].moe.num_routed
    for m in _metrics(runs["spec"])[:5]:
        received = [m[f"ep/rank{r}/received"] for r in range(2)]
        assert sum(received) == sum(m[f"ep/rank{r}/sent_e{e}"] for r in range(2) for e in range(E)) > 0
        # The routing tally counts real tokens' picks; the exchange carries padding's too.
        assert sum(received) >= sum(m[f"moe/L{y}/tokens_e{e}"] for y in range(2) for e in range(E))
        assert m["ep/imbalance"] >= 1.0 and m["ep/rank0/sent_remote"] > 0 and m["ep/rank1/exchange_s"] > 0
    assert list((runs["spec"].run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_sharded_checkpoint_is_one_released_folder(runs, env):
    folders = [
        d for d in (Path(runs["spec"].storage_path) / "ep").glob("checkpoint_*") if read_meta(d).get("step") == 4
    ]
    assert len(folders) == 1
    ckpt = folders[0]
    assert read_meta(ckpt)["expert_parallel"] == 2
    assert len(list(ckpt.glob("optimizer-experts-*-of-00002.pt"))) == 2
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    files = set(index.values())
    assert len(files) == 2 and all((ckpt / f).is_file() for f in files)  # one per EP rank
    assert {
        index[f"model.layers.0.mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{k}.up_proj.weight"]
        for k in range(4)
    } == files  # experts 0-1 in one rank's file, 2-3 in the other's
    model = load_pretrained(ckpt, dtype=torch.float32)
    start = load_pretrained(env["root"] / "init", dtype=torch.float32)
    assert not torch.equal(
        model.language_model.layers[1].mlp.routed_experts[3].up_proj.weight,
        start.language_model.layers[1].mlp.routed_experts[3].up_proj.weight,
    )
    # What `launch_experts` reads for each expert actor and the trunk: the same tensors, from
    # whichever rank's shard holds them.
    from unimoe_ray.parallel.weights import expert_state, load_expert_state, load_trunk_state, trunk_state

    for k in range(4):
        got, want = load_expert_state(ckpt, k), expert_state(model, k)
        assert sorted(got) == sorted(want) and all(torch.equal(got[n].float(), want[n]) for n in want)
    trunk, want = load_trunk_state(ckpt), trunk_state(model)
    assert sorted(trunk) == sorted(want)
    # (the vision patch embedding keeps its on-disk 4-D conv layout here: the trunk builder
    # applies checkpoint.to_memory_layout, a reshape)
    assert [n for n in want if not torch.equal(trunk[n].float().reshape(want[n].shape), want[n])] == []
