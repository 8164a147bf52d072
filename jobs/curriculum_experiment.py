"""Does the curriculum pay off? Four variants under one compute budget (optimizer steps of
token-capped batches, the same --max-tokens), per-task validation loss, several seeds.

    python jobs/curriculum_experiment.py --shards data/imbalanced_shards \
        --tokenizer data/mini/assets/tokenizer --preset small --budget-steps 240 --seeds 0 1

Variants (docs/DESIGN.md §2, paper §4 and its ablations):
- specialists: one dense specialist per task, budget/4 steps each on that task's rows;
- naive_dense: one dense model with the MoE's total FFN parameters, budget steps on the
  imbalanced mix as it is;
- top2_moe: a Top-2 MoE (same experts) trained jointly from scratch, budget steps, imbalanced;
- curriculum: specialists at budget/8 steps each, integration, stage 2 (router + shared
  experts, budget/8 steps, balanced batches), stage 3 (everything, 3·budget/8, balanced).

Not a CI job. It runs in one process with the library's torch-only step, batching and
integration (unimoe_ray.train), not under Ray Train: the point is the training recipe, and on a
small machine the budget is better spent on steps than on worker start-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import torch

from unimoe_ray.builders import new_model
from unimoe_ray.config import get_preset
from unimoe_ray.tasks import DATA_TASKS
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.text.prompts import PromptBuilder, config_for_tokenizer
from unimoe_ray.text.tokenizer import load_tokenizer
from unimoe_ray.train.batches import ExampleBuilder, collate, pack_by_tokens
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.integrate import apply_trainable, integrate_specialists, specialist_config
from unimoe_ray.train.optim import TorchBackend
from unimoe_ray.data.shards import shard_paths
from unimoe_ray.train.run import split_rows
from unimoe_ray.train.step import LossModule, evaluate, train_step

TASKS = DATA_TASKS


def batches_forever(examples: list, max_tokens: int, rng: np.random.Generator, balanced: bool):
    """Token-capped batches; balanced: each epoch draws the same number of rows per task
    (scarce tasks repeated), else the rows as they are."""
    by_task: dict[str, list] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    while True:
        if balanced:
            n = max(len(v) for v in by_task.values())
            epoch = [v[i] for v in by_task.values() for i in rng.permutation(np.resize(np.arange(len(v)), n))]
        else:
            epoch = list(examples)
        order = rng.permutation(len(epoch))
        epoch = sorted((epoch[i] for i in order[: len(order)]), key=lambda e: e.length)
        batches = pack_by_tokens(epoch, max_tokens)
        for i in rng.permutation(len(batches)):
            yield batches[i]


def train(model, examples, steps, *, stage, lr, max_tokens, seed, balanced=False, trainable="all"):
    if steps <= 0:
        return model
    model.train()
    apply_trainable(model, trainable)
    model.lm_head.weight.requires_grad_(False)
    tc = stage_config(stage, lr=lr, max_steps=steps, warmup_steps=max(1, steps // 20), max_tokens=max_tokens)
    backend = TorchBackend(LossModule(model), tc)
    stream = batches_forever(examples, max_tokens, np.random.default_rng(seed), balanced)
    uses_aux = model.cfg.moe.mode != "dense" and stage != "stage1"
    for step in range(steps):
        res = train_step(backend, [collate(next(stream), model.cfg)], aux_weight=model.cfg.moe.aux_weight(step) if uses_aux else 0.0)
        if res.skipped:
            raise RuntimeError(f"non-finite loss at step {step}: {res.cause}")
    return model


def run_seed(seed, cfg, tok, train_ex, val_batches, args) -> dict:
    B, lr = args.budget_steps, args.lr
    kw = dict(max_tokens=args.max_tokens, seed=seed)
    results, walls = {}, {}
    by_task = {t: [e for e in train_ex if e.task == t] for t in TASKS}
    spec_cfg = specialist_config(cfg, len(TASKS))

    t0 = time.perf_counter()
    results["specialists"] = {}
    for i, t in enumerate(TASKS):
        torch.manual_seed(seed * 100 + i)
        m = train(new_model(spec_cfg, tok, seed=seed * 100 + i), by_task[t], B // 4, stage="stage1", lr=lr, **kw)
        results["specialists"][t] = evaluate(m, val_batches)[t]
    walls["specialists"] = time.perf_counter() - t0
    print(f"seed {seed}: specialists done in {walls['specialists']:.0f} s", flush=True)

    t0 = time.perf_counter()
    moe = cfg.moe
    dense_cfg = cfg.replace(moe=dict(mode="dense", dense_intermediate=moe.num_routed * moe.routed_intermediate + moe.num_shared * moe.shared_intermediate))
    torch.manual_seed(seed)
    m = train(new_model(dense_cfg, tok, seed=seed), train_ex, B, stage="stage1", lr=lr, **kw)
    results["naive_dense"] = evaluate(m, val_batches)
    walls["naive_dense"] = time.perf_counter() - t0
    print(f"seed {seed}: naive_dense done in {walls['naive_dense']:.0f} s", flush=True)

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    m = train(new_model(cfg.replace(moe=dict(mode="top_k", top_k=2)), tok, seed=seed), train_ex, B,
              stage="stage3", lr=lr, **kw)
    results["top2_moe"] = evaluate(m, val_batches)
    walls["top2_moe"] = time.perf_counter() - t0
    print(f"seed {seed}: top2_moe done in {walls['top2_moe']:.0f} s", flush=True)

    t0 = time.perf_counter()
    states = {}
    for i, t in enumerate(TASKS):
        torch.manual_seed(seed * 100 + i)
        m = train(new_model(spec_cfg, tok, seed=seed * 100 + i), by_task[t], B // 8, stage="stage1", lr=lr, **kw)
        states[t] = m.state_dict()
    merged_cfg, state = integrate_specialists(states, spec_cfg, seed=seed)
    m = UniMoEAudio(merged_cfg)
    m.load_state_dict(state)
    m = train(m, train_ex, B // 8, stage="stage2", lr=lr * 0.3, balanced=True, trainable="router_and_shared", **kw)
    m = train(m, train_ex, B - B // 2 - B // 8, stage="stage3", lr=lr * 0.1 * args.stage3_lr_scale, balanced=True, **kw)
    results["curriculum"] = evaluate(m, val_batches)
    walls["curriculum"] = time.perf_counter() - t0
    print(f"seed {seed}: curriculum done in {walls['curriculum']:.0f} s", flush=True)
    return {"val": results, "wall_s": walls}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--budget-steps", type=int, default=240)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3, help="stage-1 lr; stage 2/3 use the paper's ratios (0.3x, 0.1x)")
    p.add_argument("--stage3-lr-scale", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="benchmarks/results/curriculum_experiment.json")
    args = p.parse_args(argv)

    tok = load_tokenizer(args.tokenizer)
    cfg = config_for_tokenizer(get_preset(args.preset), tok)
    build = ExampleBuilder(PromptBuilder(tok, cfg), cfg)
    rows = pads.dataset(shard_paths(args.shards), format="parquet").to_table().to_pylist()
    counts, val_ids = split_rows(rows, stage_config("stage3", val_max_rows=8))
    train_ex = [build(r) for r in rows if r["sample_id"] not in val_ids and r["task"] in TASKS]
    val_ex = [build(r) for r in rows if r["sample_id"] in val_ids]
    val_batches = [collate(b, cfg) for t in TASKS for b in pack_by_tokens([e for e in val_ex if e.task == t], args.max_tokens)]
    t0 = time.perf_counter()
    runs = {seed: run_seed(seed, cfg, tok, train_ex, val_batches, args) for seed in args.seeds}
    out = {
        "args": vars(args), "rows": counts, "val_rows": {t: sum(e.task == t for e in val_ex) for t in TASKS},
        "train_rows": {t: sum(e.task == t for e in train_ex) for t in TASKS}, "runs": runs,
        "wall_s_total": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"rows per task (train): {out['train_rows']}; wall {out['wall_s_total']:.0f} s")
    print("| variant | " + " | ".join(TASKS) + " |")
    for variant in ("specialists", "naive_dense", "top2_moe", "curriculum"):
        cells = []
        for t in TASKS:
            vals = [runs[s]["val"][variant][t] for s in args.seeds]
            cells.append(f"{np.mean(vals):.2f} ± {np.std(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
