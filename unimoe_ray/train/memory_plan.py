"""Memory per training rank, planned before any weight exists: parameters, gradients, AdamW state
and activations for W workers, expert-parallel size N, a ZeRO stage, a sequence length and an
activation dtype. Parameter counts come from the model built on the meta device (exact); the
activation figure is an estimate of what autograd keeps for the backward (formula below).

What the trainer holds per rank (unimoe_ray.train.loop, fp32 master weights; `--precision bf16`
only autocasts the compute):
- parameters, fp32: the replicated ones + E/N routed experts of every layer;
- gradients, fp32: the trainable ones (stage 2: router + shared experts only);
- AdamW: two fp32 moments per trainable parameter;
- ZeRO (DeepSpeed, N = 1 only in the trainer): stage ≥ 1 divides the optimizer state over the
  data-parallel ranks, ≥ 2 the gradients too, 3 the parameters too. For N > 1 the planner divides
  replicated state over W and expert state over the W/N expert-data-parallel ranks, the layout
  DeepSpeed-MoE uses; the trainer does not run that combination (`--expert-parallel` refuses
  `--deepspeed`), so those rows are a what-if.

Activations kept for backward, per token of a micro-batch (`seq_len` tokens per rank), in the
activation dtype (a bytes), per decoder layer:
  attention: 2 norms' in/out 4D, q/k/v before and after RoPE 2·(D + 2·kv), attention output D,
             o_proj output D; plus the softmax probabilities H·L per token when the attention
             kernel keeps them (`attention_probs`: CPU math kernel yes, flash attention no);
  MoE:       router logits and their softmaxes in fp32 3·E_all·4 bytes; each shared expert
             D + 3·F_s; each routed assignment (k̄ per token) gathered input D, gate/up/act 3·F_r,
             output D, and, expert-parallel, the received copy D and the returned copy D;
plus the codec head's fp32 logits and log-softmax over the labelled tokens 2·K·V·4 bytes per
token, and the embedding output. k̄ defaults to 4 of 8 routed experts (paper: 4.8B activated on
average ≈ 4 routed experts). Allocator slack, the CPU/CUDA runtime and Python are not included:
`benchmarks/train_ep.py` measures peak RSS beside the plan.

Shape names: D hidden, F_r / F_s routed / shared expert width, E routed experts, H heads,
kv KV-heads · head dim, K codebooks, V codec vocab, L sequence length.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from unimoe_ray.config import ModelConfig
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.train.integrate import is_stage2_trainable

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one rank. `expert_*`: the routed experts' part of each figure."""

    params: int
    grads: int
    optimizer: int
    activations: int
    expert_params: int
    expert_grads: int
    expert_optimizer: int
    runs_in_trainer: bool  # False: a ZeRO stage with N > 1 (not implemented, a what-if)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def parameter_counts(cfg: ModelConfig, trainable: str = "all") -> dict[str, int]:
    """Exact counts from the meta-device model: replicated / routed-expert parameters, and of
    those the trainable ones (stage 2 trains the router and shared experts only; lm_head never
    trains, as in the loop)."""
    with torch.device("meta"):
        model = UniMoEAudio(cfg)
    out = dict.fromkeys(("replicated", "experts", "replicated_trainable", "experts_trainable"), 0)
    for name, p in model.named_parameters():
        kind = "experts" if ".routed_experts." in name else "replicated"
        out[kind] += p.numel()
        trains = name != "lm_head.weight" and (trainable == "all" or is_stage2_trainable(name))
        if trains:
            out[f"{kind}_trainable"] += p.numel()
    return out


def activation_bytes(
    cfg: ModelConfig,
    *,
    seq_len: int,
    dtype: str,
    expert_parallel: int,
    routed_per_token: float = 4.0,
    attention_probs: bool = False,
) -> int:
    """The estimate above for one micro-batch of `seq_len` tokens (all labelled)."""
    a = _BYTES[dtype]
    m = cfg.moe
    D, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attention = 4 * D + 2 * (D + 2 * kv) + 2 * D
    if attention_probs:
        attention += cfg.num_heads * seq_len
    routed = routed_per_token * (2 * D + 3 * m.routed_intermediate + (2 * D if expert_parallel > 1 else 0))
    shared = m.num_shared * (D + 3 * m.shared_intermediate)
    per_token_layer = (attention + shared + routed) * a + 3 * m.num_experts * 4
    if m.mode == "dense":
        per_token_layer = (attention + D + 3 * m.dense_intermediate) * a
    head = 2 * cfg.codec_channels * cfg.codec_vocab_size * 4
    return int(seq_len * (cfg.num_layers * per_token_layer + head + D * a))


def layout_fits(cfg: ModelConfig, *, workers: int, expert_parallel: int) -> bool:
    """Whether expert-parallel size N divides the workers and the routed experts per layer (a
    dense model has none to divide)."""
    N = expert_parallel
    return workers % N == 0 and (cfg.moe.mode == "dense" or cfg.moe.num_routed % N == 0)


def plan(
    cfg: ModelConfig,
    *,
    workers: int,
    expert_parallel: int = 1,
    zero_stage: int = 0,
    seq_len: int = 4096,
    dtype: str = "bf16",
    trainable: str = "all",
    routed_per_token: float = 4.0,
    attention_probs: bool = False,
) -> MemoryPlan:
    """Per-rank memory of one configuration (see the module docstring)."""
    if dtype not in _BYTES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(_BYTES)}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: use 0, 1, 2 or 3")
    N = expert_parallel
    if not layout_fits(cfg, workers=workers, expert_parallel=N):
        raise ValueError(
            f"expert-parallel size {N} must divide the {workers} workers and the "
            f"{cfg.moe.num_routed} routed experts per layer"
        )
    c = parameter_counts(cfg, trainable)
    edp = workers // N  # ranks holding the same experts

    def split(n: int, ranks: int, stage_needed: int) -> int:
        return -(-n // ranks) if zero_stage >= stage_needed else n

    rep_p, exp_p = split(c["replicated"], workers, 3), split(c["experts"] // N, edp, 3)
    rep_g, exp_g = split(c["replicated_trainable"], workers, 2), split(c["experts_trainable"] // N, edp, 2)
    rep_o, exp_o = split(c["replicated_trainable"], workers, 1), split(c["experts_trainable"] // N, edp, 1)
    return MemoryPlan(
        params=4 * (rep_p + exp_p),
        grads=4 * (rep_g + exp_g),
        optimizer=8 * (rep_o + exp_o),
        activations=activation_bytes(
            cfg,
            seq_len=seq_len,
            dtype=dtype,
            expert_parallel=N,
            routed_per_token=routed_per_token,
            attention_probs=attention_probs,
        ),
        expert_params=4 * exp_p,
        expert_grads=4 * exp_g,
        expert_optimizer=8 * exp_o,
        runs_in_trainer=N == 1 or zero_stage == 0,
    )


def plan_grid(
    cfg: ModelConfig, *, workers: Sequence[int], expert_parallel: Sequence[int], zero_stages: Sequence[int], **options
) -> list[dict]:
    """One row per (workers W, expert-parallel size N, ZeRO stage) the model can be laid out in
    (layout_fits; the others are left out): `plan(cfg, ..., **options).as_dict()` with the three
    sizes, in the order of the arguments."""
    return [
        {
            "workers": W,
            "expert_parallel": N,
            "zero": Z,
            **plan(cfg, workers=W, expert_parallel=N, zero_stage=Z, **options).as_dict(),
        }
        for W, N, Z in itertools.product(workers, expert_parallel, zero_stages)
        if layout_fits(cfg, workers=W, expert_parallel=N)
    ]


def markdown_table(rows: list[dict], *, device_gib: float) -> str:
    """plan_grid's rows in GiB per rank, with whether each fits a device of `device_gib` GiB;
    `what-if` marks ZeRO with N > 1, which the trainer does not run."""
    lines = [
        f"| W | N | ZeRO | params (experts) | grads | AdamW | activations | total | fits {device_gib:g} GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fits = "yes" if r["total"] / GIB <= device_gib else "no"
        note = "" if r["runs_in_trainer"] else " (what-if)"
        lines.append(
            f"| {r['workers']} | {r['expert_parallel']} | {r['zero']}{note} | {r['params'] / GIB:.1f} "
            f"({r['expert_params'] / GIB:.1f}) | {r['grads'] / GIB:.1f} | {r['optimizer'] / GIB:.1f} | "
            f"{r['activations'] / GIB:.1f} | {r['total'] / GIB:.1f} | {fits} |"
        )
    return "\n".join(lines)
