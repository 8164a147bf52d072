"""The curriculum experiment (issue 20; docs/DESIGN.md §2, paper §4 and its ablations): does
the three-stage recipe beat joint training when every variant starts from the same weights,
spends the same training FLOPs and sees the same data? Torch only (no Ray), one process: the
library's batching (`batches.batch_stream`), step (`step.train_step`) and integration
(`integrate`), the same code the Ray Train stages run.

Variants, per seed, all from ONE initialisation: a dense model of the specialist's shape
(`integrate.specialist_config`), from `builders.new_model(seed)` or a local Qwen2.5-VL folder
(`checkpoint_hf.init_from_qwen2_5_vl`, the paper's start):
- naive_dense: that dense model trained jointly on every task's rows (Unify-Dense);
- top2_moe: the DCMoE made from the init by the stage-2 integration rule applied to copies of
  the init (routed expert s·per + j = slice j of the init FFN, down_proj × per; router and
  shared experts new, shared down_proj zero: at the start the block equals the init FFN), but
  routed Top-2, trained jointly (Unify-MoE): same experts, same data, no curriculum;
- curriculum_no_stage1: the same integration of the untrained init (Top-P), then stages 2-3;
- curriculum: stage 1 (one specialist per task, each from the init, on its task's rows),
  integration, stage 2 (router + shared experts), stage 3 (everything);
- specialists (reference row): the curriculum's stage-1 specialists, each on its own task.

Compute: every variant gets the same budget of training FLOPs (`FlopRule`): forward 2·W·n
(W the matmul weights a token passes: attention, the dense FFN or router + shared experts,
the routed experts it was sent to, counted from the step's routing; the codec head at
labelled positions), backward 2·W·n for the activation gradients (they run through the whole
trunk: every stage trains something in every layer) + 2·W_trainable·n for the weight
gradients. Not counted: attention scores, the vision tower, embedding look-ups, norms (the
same per token in every variant). A phase stops at the first step that reaches its budget
and the next phase's budget is what is left of the cumulative target, so each variant spends
its budget to within one step's FLOPs. The curriculum splits its
budget by `stage_shares` (stage 1 over the specialists equally); without stage 1 the stage
2 and 3 shares are scaled to the whole budget.

Data: the rows as the preprocessing pipeline wrote them (its balancing is the only one); no
variant is oversampled; specialists train on their task's rows of the same set. Validation:
whole source clips (`batches.split_rows`), so no clip has windows on both sides.

Shape legend: Y MoE layers.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from unimoe_ray.builders import new_model
from unimoe_ray.config import ModelConfig
from unimoe_ray.config_hf import to_hf_dict
from unimoe_ray.model.unimoe_audio import IGNORE_INDEX, UniMoEAudio
from unimoe_ray.tasks import DATA_TASKS
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.train.batches import Batch, Example, ExampleBuilder, batch_stream, collate, pack_by_tokens, split_rows
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.integrate import apply_trainable, integrated_model, specialist_config
from unimoe_ray.train.optim import TorchBackend
from unimoe_ray.train.routing import RoutingTally, routing_by_task, routing_report
from unimoe_ray.train.step import LossModule, evaluate, train_step

VARIANTS = ("naive_dense", "top2_moe", "curriculum_no_stage1", "curriculum")
REFERENCE = "specialists"


class ExperimentError(ValueError):
    """Bad experiment input; the message names the cause and the fix."""


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    budget_flops: float  # training FLOPs per variant (FlopRule)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    max_tokens: int = 2048  # padded tokens per step (one micro-batch)
    lr: float = 1e-3  # joint variants and stage 1
    stage2_lr_scale: float = 0.3  # paper: 3e-5 / 1e-4
    stage3_lr_scale: float = 0.1  # paper: 1e-5 / 1e-4
    stage_shares: tuple[float, float, float] = (0.5, 0.125, 0.375)  # of the budget: stage 1, 2, 3
    val_fraction: float = 0.2  # of each task's rows, as whole clips
    val_max_rows: int = 64
    evals_per_phase: int = 2  # validation points in each phase (the last at its end)
    shuffle_window: int = 256
    init_from: str | None = None  # a local Qwen2.5-VL folder: the common init

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        checks = [
            (self.budget_flops > 0, f"budget_flops={self.budget_flops}: must be > 0"),
            (bool(self.seeds), "no seeds: give at least one (three or more to see the spread)"),
            (not unknown, f"unknown variants {sorted(unknown)}: use {list(VARIANTS)}"),
            (
                len(self.stage_shares) == 3 and min(self.stage_shares) > 0 and abs(sum(self.stage_shares) - 1) < 1e-6,
                f"stage_shares={self.stage_shares}: three positive shares summing to 1",
            ),
            (0 < self.val_fraction < 1, f"val_fraction={self.val_fraction}: must be in (0, 1)"),
            (self.evals_per_phase >= 1, "evals_per_phase must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ExperimentError(msg)


# ---- FLOPs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopRule:
    """Matmul weights per unit of work, all and trainable: per real token (attention, dense
    FFN / router + shared experts), per routed pick (one token sent to one routed expert in
    one layer) and per labelled position (the codec head)."""

    per_token: float
    per_pick: float
    per_label: float
    per_token_trainable: float
    per_pick_trainable: float
    per_label_trainable: float

    @classmethod
    def of(cls, model: UniMoEAudio) -> "FlopRule":
        w = {k: 0.0 for k in ("token", "pick", "label")}
        t = dict(w)
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.startswith(("visual.", "lm_head.")) or "embed" in name or "norm" in name:
                continue  # not a matmul per token (module docstring)
            kind = "label" if name.startswith("codec_head.") else "pick" if ".routed_experts." in name else "token"
            w[kind] += p.numel()
            t[kind] += p.numel() if p.requires_grad else 0
        cfg = model.cfg
        experts = cfg.num_layers * cfg.moe.num_routed if cfg.moe.mode != "dense" else 1
        return cls(w["token"], w["pick"] / experts, w["label"], t["token"], t["pick"] / experts, t["label"])

    def flops(self, *, tokens: float, picks: float, labels: float) -> float:
        fwd = self.per_token * tokens + self.per_pick * picks + self.per_label * labels
        wgrad = self.per_token_trainable * tokens + self.per_pick_trainable * picks + self.per_label_trainable * labels
        return 2 * fwd + 2 * fwd + 2 * wgrad


def batch_counts(batch: Batch) -> tuple[int, int]:
    """(real tokens, labelled positions: any codebook labelled, what the codec head sees)."""
    return batch.num_tokens, int((batch.labels_BKL != IGNORE_INDEX).any(1).sum())


# ---- data -------------------------------------------------------------------------------


@dataclass
class Data:
    """Training rows (dicts, in sample-id order) and validation batches per task."""

    train_rows: list[dict]
    val_batches: dict[str, list[Batch]]
    build: Callable[[dict], Example]
    summary: dict


def prepare_data(rows: list[dict], cfg: ModelConfig, prompts: PromptBuilder, ecfg: ExperimentConfig) -> Data:
    """Split by source clip, build every example once (cached by sample id), pack validation."""
    tasks = tuple(t for t in DATA_TASKS if any(r["task"] == t for r in rows))
    if len(tasks) < 2:
        raise ExperimentError(f"the shards hold rows of {list(tasks)} only: the experiment needs two or more tasks")
    if "source_id" not in rows[0]:
        raise ExperimentError("the rows have no source_id column: use shards written by jobs/preprocess.py")
    tc = stage_config("stage3", tasks=tasks, val_max_rows=ecfg.val_max_rows)
    _, val_ids = split_rows(rows, tc, val_fraction=ecfg.val_fraction)
    builder = ExampleBuilder(prompts, cfg)
    cache: dict[str, Example] = {}

    def build(row: dict) -> Example:
        sid = row["sample_id"]
        if sid not in cache:
            cache[sid] = builder(row)
        return cache[sid]

    rows = sorted(rows, key=lambda r: r["sample_id"])
    train_rows = [r for r in rows if r["sample_id"] not in val_ids]
    val_rows = [r for r in rows if r["sample_id"] in val_ids]
    val_batches = {
        t: [
            collate(b, cfg)
            for b in pack_by_tokens(
                sorted((build(r) for r in val_rows if r["task"] == t), key=lambda e: e.length), ecfg.max_tokens
            )
        ]
        for t in tasks
    }
    empty = [t for t in tasks if not val_batches[t]]
    if empty:
        raise ExperimentError(f"no validation clip for {empty}: those tasks need two or more source clips")
    for r in train_rows:
        build(r)  # fail on a bad row now, not mid-run
    clips = lambda part, t: len({r["source_id"] for r in part if r["task"] == t})  # noqa: E731
    summary = {
        "tasks": list(tasks),
        "train_rows": {t: sum(r["task"] == t for r in train_rows) for t in tasks},
        "val_rows": {t: sum(r["task"] == t for r in val_rows) for t in tasks},
        "train_clips": {t: clips(train_rows, t) for t in tasks},
        "val_clips": {t: clips(val_rows, t) for t in tasks},
        "val_label_positions": {t: sum(batch_counts(b)[1] for b in val_batches[t]) for t in tasks},
    }
    return Data(train_rows, val_batches, build, summary)


# ---- one training phase ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Phase:
    name: str
    stage: str  # stage1 | stage2 | stage3 (train.config presets: schedule, aux loss)
    tasks: tuple[str, ...]
    budget: float
    lr: float
    trainable: str = "all"
    stream_seed: int = 0


@dataclass
class Curve:
    """x: the variant's FLOPs so far; train: (x, CE) per step; val: (x, {task: loss})."""

    train: list[tuple[float, float]] = field(default_factory=list)
    val: list[tuple[float, dict[str, float]]] = field(default_factory=list)


def _planned_steps(model: UniMoEAudio, rule: FlopRule, stream_of: Callable, budget: float, cfg: ModelConfig) -> int:
    """Steps the phase should take (its lr schedule's length): the budget over the FLOPs of
    the stream's first batches, routed picks measured by one forward of the model as it is."""
    stream = stream_of()
    batches = [collate(next(stream), cfg) for _ in range(8)]
    picks_per_token = 0.0
    if cfg.moe.mode != "dense":
        tally = routing_by_task(model, {"probe": batches[:1]})["probe"]
        picks_per_token = float(tally.routed_sum_Y.sum()) / max(float(tally.tokens_Y[0]), 1.0)
    per_step = []
    for b in batches:
        tokens, labels = batch_counts(b)
        per_step.append(rule.flops(tokens=tokens, picks=picks_per_token * tokens, labels=labels))
    return max(1, math.ceil(budget / float(np.mean(per_step))))


def train_phase(
    model: UniMoEAudio,
    data: Data,
    phase: Phase,
    ecfg: ExperimentConfig,
    *,
    curve: Curve,
    offset: float,
    log: Callable[[str], None],
) -> dict:
    """Train until the phase's FLOP budget is spent; validation at evals_per_phase points
    (on the phase's tasks). Returns what it did."""
    rows = [r for r in data.train_rows if r["task"] in phase.tasks]
    if not rows:
        raise ExperimentError(f"phase {phase.name}: no training rows of {list(phase.tasks)}")
    apply_trainable(model, phase.trainable)
    rule = FlopRule.of(model)
    windows = [rows[i : i + ecfg.shuffle_window] for i in range(0, len(rows), ecfg.shuffle_window)]

    def stream_of():
        return batch_stream(lambda: windows, data.build, max_tokens=ecfg.max_tokens, seed=phase.stream_seed, rank=0)

    planned = _planned_steps(model, rule, stream_of, phase.budget, model.cfg)
    tc = stage_config(
        phase.stage,
        lr=phase.lr,
        max_steps=planned,
        warmup_steps=max(1, planned // 20),
        max_tokens=ecfg.max_tokens,
        tasks=phase.tasks,
    )
    model.train()
    backend = TorchBackend(LossModule(model), tc)
    stream = stream_of()
    uses_aux = model.cfg.moe.mode != "dense" and tc.use_aux_loss
    marks = [phase.budget * (i + 1) / ecfg.evals_per_phase for i in range(ecfg.evals_per_phase)]
    val_batches = [b for t in phase.tasks for b in data.val_batches[t]]
    spent, step, largest, t0 = 0.0, 0, 0.0, time.perf_counter()
    while spent < phase.budget:
        batch = collate(next(stream), model.cfg)
        res = train_step(backend, [batch], aux_weight=model.cfg.moe.aux_weight(step) if uses_aux else 0.0)
        if res.skipped:
            raise RuntimeError(f"{phase.name}: non-finite loss at step {step}: {res.cause}; lower the lr")
        tokens, labels = batch_counts(batch)
        picks = float(res.routing.routed_sum_Y.sum()) if res.routing is not None else 0.0
        flops = rule.flops(tokens=tokens, picks=picks, labels=labels)
        spent += flops
        largest = max(largest, flops)
        step += 1
        curve.train.append((offset + spent, res.ce))
        while marks and spent >= marks[0]:
            marks.pop(0)
            curve.val.append((offset + spent, evaluate(model, val_batches)))
    wall = time.perf_counter() - t0
    log(
        f"  {phase.name}: {step} steps (planned {planned}), {spent:.3g} FLOPs, last CE {res.ce:.2f}, "
        f"val {_fmt(curve.val[-1][1])}, {wall:.0f} s"
    )
    return {
        "name": phase.name,
        "steps": step,
        "planned_steps": planned,
        "budget": phase.budget,
        "flops": spent,
        "max_step_flops": largest,
        "wall_s": wall,
        "lr": phase.lr,
        "tasks": list(phase.tasks),
    }


def _fmt(val: dict[str, float]) -> str:
    return " ".join(f"{t} {v:.2f}" for t, v in val.items())


# ---- the variants ----------------------------------------------------------------------


def common_init(
    target: ModelConfig, tokenizer, tasks: tuple[str, ...], seed: int, init_from: str | None
) -> UniMoEAudio:
    """The one initialisation a seed's variants all start from: a dense specialist-shaped
    model (random, or copied from a local Qwen2.5-VL folder)."""
    torch.manual_seed(seed)  # the vision tower is initialised by transformers from this RNG
    model = new_model(specialist_config(target, len(tasks)), tokenizer, seed=seed)
    if init_from:
        from unimoe_ray.checkpoint_hf import init_from_qwen2_5_vl

        init_from_qwen2_5_vl(model, init_from)
    return model


def merged_model(
    states: dict[str, dict[str, torch.Tensor]], spec_cfg: ModelConfig, *, seed: int, mode: str = "top_p"
) -> UniMoEAudio:
    """Stage-2 integration of (task → dense state dict); `mode` top_k: routed Top-2 instead of
    Top-P (same tensors: the router is as wide either way)."""
    return integrated_model(states, spec_cfg, seed=seed, moe=dict(mode="top_k", top_k=2) if mode == "top_k" else None)


def run_variant(
    variant: str, init: UniMoEAudio, data: Data, ecfg: ExperimentConfig, seed: int, log: Callable[[str], None]
) -> dict:
    """Train one variant from (a copy of) the seed's init; returns its record."""
    tasks = tuple(data.summary["tasks"])
    F, lr = ecfg.budget_flops, ecfg.lr
    s1, s2, s3 = ecfg.stage_shares
    curve, phases, extra = Curve(), [], {}
    offset = 0.0
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}

    target = 0.0  # the variant's budget up to the end of the current phase

    def run(model, phase):
        # A phase's budget is its share of the cumulative target minus what the variant has
        # spent: one phase's overshoot (it stops at the first step past its budget) comes off
        # the next, so the variant ends within one step of F however many phases it has.
        nonlocal offset, target
        target += phase.budget
        share = phase.budget
        phase = replace(phase, budget=max(target - offset, 1.0))
        phases.append({**train_phase(model, data, phase, ecfg, curve=curve, offset=offset, log=log), "share": share})
        offset += phases[-1]["flops"]

    joint = dict(tasks=tasks, stream_seed=seed * 10 + 1)
    late = dict(tasks=tasks, stream_seed=seed * 10 + 3)
    if variant == "naive_dense":
        model = copy.deepcopy(init)
        run(model, Phase(name="joint dense", stage="stage1", budget=F, lr=lr, **joint))
    elif variant == "top2_moe":
        model = merged_model({t: init_state for t in tasks}, init.cfg, seed=seed, mode="top_k")
        run(model, Phase(name="joint top-2", stage="stage3", budget=F, lr=lr, **joint))
    else:
        if variant == "curriculum":
            states, spec_val = {}, {}
            first_val = len(curve.val)
            for i, t in enumerate(tasks):
                spec = copy.deepcopy(init)
                run(
                    spec,
                    Phase(
                        name=f"stage 1 {t}",
                        stage="stage1",
                        tasks=(t,),
                        budget=F * s1 / len(tasks),
                        lr=lr,
                        stream_seed=seed * 10 + 5 + i,
                    ),
                )
                states[t] = spec.state_dict()
                spec_val[t] = curve.val[-1][1][t]
            extra["specialists"] = spec_val
            # One validation point for stage 1: the system of specialists, each on its task.
            del curve.val[first_val:]
            curve.val.append((offset, spec_val))
            share2, share3 = s2, s3
        else:
            states = {t: init_state for t in tasks}
            share2, share3 = s2 / (s2 + s3), s3 / (s2 + s3)
        model = merged_model(states, init.cfg, seed=seed)
        curve.val.append((offset, evaluate(model, [b for t in tasks for b in data.val_batches[t]])))
        log(f"  integrated: val {_fmt(curve.val[-1][1])}")
        run(
            model,
            Phase(
                name="stage 2",
                stage="stage2",
                budget=F * share2,
                lr=lr * ecfg.stage2_lr_scale,
                trainable="router_and_shared",
                tasks=tasks,
                stream_seed=seed * 10 + 2,
            ),
        )
        run(model, Phase(name="stage 3", stage="stage3", budget=F * share3, lr=lr * ecfg.stage3_lr_scale, **late))
    routing = None
    if model.cfg.moe.mode != "dense":
        routing = routing_by_task(model, data.val_batches)
    return {
        "val": curve.val[-1][1],
        "flops": offset,
        "phases": phases,
        "wall_s": time.perf_counter() - t0,
        "curve": {"train": curve.train, "val": curve.val},
        "routing": routing,
        **extra,
    }


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def _sum_tallies(tallies: list[dict[str, RoutingTally]]) -> dict[str, RoutingTally]:
    out = {}
    for task in tallies[0]:
        parts = [t[task] for t in tallies]
        first = parts[0]
        out[task] = RoutingTally(
            first.num_routed,
            sum(p.tokens_Y for p in parts),
            sum(p.routed_sum_Y for p in parts),
            sum(p.null_tokens_Y for p in parts),
            sum(p.per_expert_YE for p in parts),
            sum(p.k_hist_YH for p in parts),
        )
    return out


def run_experiment(
    target: ModelConfig, tokenizer, rows: list[dict], ecfg: ExperimentConfig, log: Callable[[str], None] = print
) -> dict:
    """Every variant × seed; returns the JSON-ready record (per-seed runs, the per-task summary
    over seeds, routing of the MoE variants summed over seeds, the data and FLOP figures)."""
    if target.moe.mode == "dense":
        raise ExperimentError("the target config is dense: pass the MoE preset the curriculum integrates into")
    data = prepare_data(rows, target, PromptBuilder(tokenizer, target), ecfg)
    tasks = tuple(data.summary["tasks"])
    log(f"data: {data.summary}")
    runs: dict[int, dict[str, dict]] = {}
    t0 = time.perf_counter()
    for seed in ecfg.seeds:
        init = common_init(target, tokenizer, tasks, seed, ecfg.init_from)
        runs[seed] = {}
        for variant in ecfg.variants:
            log(f"seed {seed} {variant}")
            runs[seed][variant] = run_variant(variant, init, data, ecfg, seed, log)
            if "specialists" in runs[seed][variant]:
                runs[seed][REFERENCE] = {"val": runs[seed][variant].pop("specialists")}
    rows_out = [v for v in (*ecfg.variants, REFERENCE) if all(v in runs[s] for s in ecfg.seeds)]
    summary = {v: {t: summarize([runs[s][v]["val"][t] for s in ecfg.seeds]) for t in tasks} for v in rows_out}
    routing = {}
    for v in rows_out:
        tallies = [runs[s][v].pop("routing", None) for s in ecfg.seeds]
        if tallies[0] is not None:
            routing[v] = routing_report(_sum_tallies(tallies))
    spec_cfg = specialist_config(target, len(tasks))
    return {
        "config": {**asdict(ecfg), "model": to_hf_dict(target), "specialist_ffn": spec_cfg.moe.dense_intermediate},
        "data": data.summary,
        "flops": {
            "budget_per_variant": ecfg.budget_flops,
            "rule": "fwd 2·W·n + bwd 2·W·n (activations) + 2·W_trainable·n (weights); W: attention, "
            "dense FFN / router + shared experts per token, routed experts per pick, codec head "
            "per labelled position",
            "spent": {str(s): {v: runs[s][v]["flops"] for v in ecfg.variants} for s in ecfg.seeds},
        },
        "runs": {str(s): r for s, r in runs.items()},
        "summary": summary,
        "routing": routing,
        "wall_s_total": time.perf_counter() - t0,
    }


def markdown_table(result: dict) -> str:
    """Per task: mean ± std (min–max) over seeds of the validation loss, one row per variant."""
    tasks = result["data"]["tasks"]
    lines = ["| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for v, per_task in result["summary"].items():
        cells = [f"{s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.2f}–{s['max']:.2f})" for s in per_task.values()]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_curves(result: dict) -> dict[str, dict[str, list]]:
    """variant → {"train": per seed [(flops, CE)], "val": per seed [(flops, mean over tasks)]}."""
    runs = result["runs"]
    return {
        v: {
            "train": [runs[s][v]["curve"]["train"] for s in runs],
            "val": [[(x, sum(val.values()) / len(val)) for x, val in runs[s][v]["curve"]["val"]] for s in runs],
        }
        for v in result["config"]["variants"]
    }


def load_rows(shards: list[str | Path]) -> list[dict]:
    """Every row of the shards (files or folders of jobs/preprocess.py)."""
    import pyarrow.dataset as pads

    from unimoe_ray.data.shards import shard_paths

    return pads.dataset(shard_paths(shards), format="parquet").to_table().to_pylist()
