"""DCMoE forward (`small` dims, fp32, eval, inference_mode) beside its roofline and beside
transformers' own sparse MoE block (Qwen2-MoE) doing the same activated work (issue 2).

Sizes: prefill 1k / 4k / 16k tokens, decode 2 / 16 / 64 tokens per step, under two routings:
- ``random``: the random-init router (near-uniform probabilities → about 5 of the 9
  routed+null experts per token, 4.4 of them routed; the paper's 4.8B activated of 7.1B
  works out to ≈ 4.2 routed experts per token);
- ``skewed``: the same router weight scaled (found by bisection) so that the mean k per token is
  ``--skew-k`` (default 3: a sharper, trained-looking router).

Roofline (a):
- prefill: plain ``torch.mm`` on contiguous matrices with exactly the GEMM shapes of that very
  forward: per routed expert (its count × D)·(D × F) twice + (count × F)·(F × D), the same for
  each shared expert on all T tokens, and the router (T × D)·(D × E); each shape timed in both
  operand orders (C = A·B and Cᵀ = Bᵀ·Aᵀ) and the faster set taken (`gemm`);
- decode: bytes of the weights actually touched (routed experts with count > 0, shared experts,
  router; fp32) ÷ the read bandwidth measured in the same round (``sum`` over a 1 GiB
  buffer in huge pages, as the weights; a copy bandwidth is printed beside it). Decode rows also show `gemm`: where it
  exceeds the memory time (16 and 64 tokens: the activated FLOPs outlast the weight reads on 2
  cores) no implementation can reach the memory roofline, and `bnd` = max(roof, gemm) is the
  floor that is. `peak` is a floor no GEMM library can beat: the activated FLOPs at the best
  rate this machine reaches on a large square GEMM (measured once at start, 2048³); where it
  exceeds `roof`, the largest reachable fraction of the memory roofline is roof/peak.

Decode sweeps a stack of `--layers` (default 8, the `small` depth) layers with one router
weight (same routing in each) and their own expert weights, timing per layer: as in a real
decode step, each layer's weights have left the cache by the time it runs again (8 × 76 MB ≫
the 32 MB L3). Prefill uses one layer (compute-bound; the cache does not matter).

Transformers (b): ``Qwen2MoeSparseMoeBlock`` with 8 experts of intermediate 1376, run at the
two integer top-k around the mean routed experts per token of our routing at that size (4 and
5 for 4.39) and its time interpolated linearly to that mean (column `hfk`), one shared expert of
intermediate 1376 (= our 2 × 688: same FLOPs and bytes) with its sigmoid gate. Both of its
expert implementations are timed, ``eager`` (per-expert loop) and ``grouped_mm`` (the default
that ``from_pretrained`` picks when torch has grouped_mm, as torch 2.13 CPU does); the ratio
is taken against the faster one. Its expert weights are random; its router weight is our
router's rows for the routed experts, so that at k equal to a token's routed k it picks the
same experts (ours ranks routed + null experts by logit, so its routed picks are the top routed
logits). At decode sizes the bytes read depend on which experts the tokens touch: with a router
of its own, transformers' top-5 touched 6.9 of 8 experts on average for 2 tokens, while ours
touched all 8 for the benchmark's 2-token input (14% more bytes for the same k).

Expert kernels (issue 12): our layers are set up as a loaded model is
(``quantize.convert_experts``: gate and up in one buffer, weights moved into huge pages, then
``autotune.select`` times the candidate formulations once per expert shape, or reads this
machine's cached choice); transformers' blocks get huge pages too, so that both sides read
the same kind of memory. The
choice and its timings are printed. ``--expert-dtypes`` adds bf16 and int8 copies of our
layers (same router, same routing) timed in the same rounds, each against its own memory
roofline: the touched weights' bytes in that dtype ÷ the same read bandwidth.

Timing: one process, ``torch.set_num_threads(--threads)`` (2), fp32, after a warm-up. Each
round times every contender once, interleaved (rotating order). A round counts as clean when
no other process preempted our threads or took CPU time meanwhile (getrusage, /proc/stat);
rounds run until `rounds` are clean (at most --patience x). Times are medians over the clean rounds (all rounds if fewer than half were
clean; the `clean` column says how many); fractions and ratios are medians of per-round
ratios, so that load which slows a whole round cancels.

    .venv/bin/python benchmarks/moe_layer.py [--quick] [--json out.json]

Shape legend: T tokens, D model dim, F expert FFN dim, E router width.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from machine import machine_line, read_probe  # benchmarks/machine.py
from torch import nn

from unimoe_ray.config import MoEConfig
from unimoe_ray.model import autotune, kernel_cache, kernels
from unimoe_ray.model.hugepages import move_to_hugepages
from unimoe_ray.model.moe import DCMoE
from unimoe_ray.model.quantize import convert_experts
from unimoe_ray.presets import get_preset

PREFILL = (1024, 4096, 16384)
DECODE = (2, 16, 64)
BYTES_FP32 = 4


# ---------------------------------------------------------------- timing helpers


class ForeignLoad:
    """How much *other* processes disturbed a sample: CPU seconds they used on this machine
    meanwhile (Linux /proc/stat minus this process's own time) and how often they preempted
    one of our threads (involuntary context switches). Elsewhere both read 0."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = os.path.exists("/proc/stat")

    def snapshot(self) -> tuple[float, float, int]:
        if not self.ok:
            return 0.0, 0.0, 0
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        own = os.times()
        return busy / self.hz, own.user + own.system, resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


LOAD = ForeignLoad()


@dataclass
class Sample:
    seconds: float
    foreign_s: float  # CPU time other processes used meanwhile
    preempted: int  # involuntary context switches of our threads meanwhile

    def clean(self) -> bool:
        # No preemption of our threads (a couple per second tolerated on long samples), and
        # other processes used at most 2% of the machine's CPU time (/proc/stat counts 10 ms
        # ticks, so a short sample must have seen none).
        return (
            self.preempted <= 2 * self.seconds and self.foreign_s <= 0.02 * self.seconds * (os.cpu_count() or 1) + 1e-9
        )


def sample(fn: Callable[[], object]) -> Sample:
    before = LOAD.snapshot()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    after = LOAD.snapshot()
    foreign = max(0.0, (after[0] - before[0]) - (after[1] - before[1]))
    return Sample(seconds, foreign, after[2] - before[2])


def timed(fn: Callable[[], object]) -> float:
    return sample(fn).seconds


def copy_bandwidth(src_N: torch.Tensor, dst_N: torch.Tensor) -> float:
    """GB/s of a copy, counting read + write."""
    return 2 * src_N.numel() * src_N.element_size() / timed(lambda: dst_N.copy_(src_N)) / 1e9


def peak_gemm_flops(n: int = 2048) -> float:
    """FLOP/s of the best of 5 large square fp32 GEMMs: the compute ceiling of this machine."""
    a_NN, b_NN, c_NN = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a_NN, b_NN, out=c_NN)
    return 2 * n**3 / min(timed(lambda: torch.mm(a_NN, b_NN, out=c_NN)) for _ in range(5))


# ---------------------------------------------------------------- the contenders


def build_ours(cfg: MoEConfig, dim: int, num_layers: int, seed: int) -> list[DCMoE]:
    """`num_layers` DCMoE layers sharing layer 0's router weight (same routing everywhere)."""
    torch.manual_seed(seed)
    layers = [DCMoE(dim=dim, cfg=cfg, layer_idx=i).eval() for i in range(num_layers)]
    with torch.no_grad():
        for layer in layers[1:]:
            layer.gate.weight.copy_(layers[0].gate.weight)
    return layers


def set_gate_scale(layers: list[DCMoE], base_E_D: torch.Tensor, scale: float) -> None:
    with torch.no_grad():
        for layer in layers:
            layer.gate.weight.copy_(base_E_D * scale)


def mean_k(layer: DCMoE, x_TD: torch.Tensor) -> float:
    with torch.inference_mode():
        return float(layer.route(x_TD).k_T.float().mean())


def find_gate_scale(layer: DCMoE, base_E_D: torch.Tensor, target_k: float, dim: int) -> float:
    """Bisection (in log scale) for the router-weight multiplier that gives mean k = target."""
    x_TD = torch.randn(8192, dim, generator=torch.Generator().manual_seed(123))
    lo, hi = 0.0, math.log(1000.0)  # k falls as the scale grows
    for _ in range(30):
        mid = (lo + hi) / 2
        with torch.no_grad():
            layer.gate.weight.copy_(base_E_D * math.exp(mid))
        if mean_k(layer, x_TD) > target_k:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def build_transformers(dim: int, cfg: MoEConfig, num_layers: int, seed: int) -> tuple[list[nn.Module], object]:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = Qwen2MoeConfig(
        hidden_size=dim,
        num_experts=cfg.num_routed,
        moe_intermediate_size=cfg.routed_intermediate,
        shared_expert_intermediate_size=cfg.shared_intermediate * cfg.num_shared,
        num_experts_per_tok=2,  # set per size through block.gate.top_k
        norm_topk_prob=True,
        hidden_act="silu",
    )
    hf_cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    blocks = []
    for _ in range(num_layers):
        block = Qwen2MoeSparseMoeBlock(hf_cfg).eval()
        with torch.no_grad():
            # Its expert tensors are torch.empty and its router zeros: give them real values
            # (std of our nn.Linear init) so that routing spreads over the experts.
            for p in block.parameters():
                p.normal_(0.0, 1.0 / math.sqrt(3 * p.shape[-1]))
        blocks.append(block)
    return blocks, hf_cfg


def share_router(blocks: list[nn.Module], layer: DCMoE, num_routed: int) -> None:
    """Transformers' routers get our router's routed-expert rows: the same token-expert picks
    at the same k (our gate scale for the skewed routing keeps the logit order, so once is enough)."""
    with torch.no_grad():
        for block in blocks:
            block.gate.weight.copy_(layer.gate.weight[:num_routed])


# ---------------------------------------------------------------- activated work


@dataclass
class Work:
    """What one forward of T tokens activates (from our routing)."""

    T: int
    counts: tuple[int, ...]
    k_mean: float  # routed + null experts per token (the paper's k)
    routed_k_mean: float  # routed experts per token (what computes)
    touched: int  # routed experts with count > 0
    flops: float
    weight_bytes: int  # weights of the touched experts + shared + router


def activated_work(layer: DCMoE, x_TD: torch.Tensor) -> Work:
    cfg, dim = layer.cfg, x_TD.shape[1]
    with torch.inference_mode():
        _, stats = layer(x_TD)
    T = x_TD.shape[0]
    counts = tuple(int(c) for c in stats.counts)
    routed_f = 2 * 3 * dim * cfg.routed_intermediate
    shared_f = 2 * 3 * dim * cfg.shared_intermediate
    flops = sum(counts) * routed_f + cfg.num_shared * T * shared_f + 2 * T * dim * cfg.num_experts
    touched = sum(1 for c in counts if c)
    weight_bytes = (
        BYTES_FP32
        * dim
        * (touched * 3 * cfg.routed_intermediate + cfg.num_shared * 3 * cfg.shared_intermediate + cfg.num_experts)
    )
    return Work(
        T=T,
        counts=counts,
        k_mean=float(stats.k_T.float().mean()),
        routed_k_mean=sum(counts) / T,
        touched=touched,
        flops=float(flops),
        weight_bytes=weight_bytes,
    )


def roofline_gemms(work: Work, cfg: MoEConfig, dim: int) -> dict[str, Callable[[], None]]:
    """Plain torch.mm on contiguous matrices, exactly the GEMM shapes of the forward, in both
    operand orders: C = A·B ("gemm") and Cᵀ = Bᵀ·Aᵀ ("gemm_t", Bᵀ contiguous, Aᵀ a transposed
    view). MKL is much faster at few rows in the second; the roofline takes the faster one."""
    shapes = []  # (M, K, N)
    for n in work.counts:
        if n:
            shapes += [(n, dim, cfg.routed_intermediate)] * 2 + [(n, cfg.routed_intermediate, dim)]
    for _ in range(cfg.num_shared):
        shapes += [(work.T, dim, cfg.shared_intermediate)] * 2 + [(work.T, cfg.shared_intermediate, dim)]
    shapes.append((work.T, dim, cfg.num_experts))
    mats = []
    for m, k, n in shapes:
        a_MK, b_KN = torch.randn(m, k), torch.randn(k, n)
        mats.append((a_MK, b_KN, torch.empty(m, n), b_KN.t().contiguous(), torch.empty(n, m)))

    def run() -> None:
        for a_MK, b_KN, c_MN, _, _ in mats:
            torch.mm(a_MK, b_KN, out=c_MN)

    def run_t() -> None:
        for a_MK, _, _, bt_NK, ct_NM in mats:
            torch.mm(bt_NK, a_MK.t(), out=ct_NM)

    return {"gemm": run, "gemm_t": run_t}


# ---------------------------------------------------------------- one size


@dataclass
class Row:
    routing: str
    phase: str
    T: int
    k_mean: float
    routed_k_mean: float
    hf_top_k: str  # "4-5": the two integer top-k the transformers block ran at
    touched: int
    gflop: float
    weight_mb: float
    ours_ms: float
    roof_ms: float  # the roofline: GEMM time (prefill) or weight-read time (decode)
    gemm_ms: float  # dense GEMM time of the same FLOPs (prefill: = roof_ms)
    peak_ms: float  # the activated FLOPs at the machine's large-GEMM rate (a compute floor)
    hf_eager_ms: float
    hf_grouped_ms: float
    read_gbs: float
    frac_roof: float  # roof / ours
    frac_bound: float  # max(roof, gemm) / ours
    vs_hf: float  # best transformers time / ours (> 1: ours faster)
    counts: tuple[int, ...] = field(default_factory=tuple)
    dtype_ms: dict = field(default_factory=dict)  # our layer with bf16 / int8 experts
    dtype_roof_ms: dict = field(default_factory=dict)  # their touched bytes / read bandwidth
    dtype_frac_roof: dict = field(default_factory=dict)  # roof / ours, that dtype
    dtype_vs_fp32: dict = field(default_factory=dict)  # fp32 ours / this dtype
    rounds: int = 0  # interleaved rounds run
    clean_rounds: int = 0  # rounds in which no other process took CPU time (used if >= half)


def bench_size(
    *,
    peak_flops: float,
    routing: str,
    phase: str,
    T: int,
    ours: list[DCMoE],
    hf: list[nn.Module],
    hf_cfg,
    variants: dict[str, list[DCMoE]],
    cfg: MoEConfig,
    dim: int,
    rounds: int,
    patience: int,
    buf_N: torch.Tensor,
    seed: int,
) -> Row:
    x_TD = torch.randn(T, dim, generator=torch.Generator().manual_seed(seed + T))
    x_1TD = x_TD[None]
    work = activated_work(ours[0], x_TD)
    # Its top-k is an integer, our mean routed k is not: it runs at both neighbours and its time
    # is interpolated linearly to our k (the work grows linearly in k), so that both sides do
    # the same activated work. With k a whole number, both neighbours are that number.
    k_lo = max(1, math.floor(work.routed_k_mean))
    k_hi = max(1, math.ceil(work.routed_k_mean))
    frac_k = work.routed_k_mean - k_lo if k_hi > k_lo else 0.0
    layers_ours = ours if phase == "decode" else ours[:1]
    layers_hf = hf if phase == "decode" else hf[:1]
    gemms = roofline_gemms(work, cfg, dim)

    def sweep(layers, arg) -> Callable[[], None]:
        def run() -> None:
            for layer in layers:
                layer(arg)

        return run

    run_ours = sweep(layers_ours, x_TD)
    layers_var = {d: (v if phase == "decode" else v[:1]) for d, v in variants.items()}
    run_hf = sweep(layers_hf, x_1TD)

    def run_hf_impl(impl: str, top_k: int) -> Callable[[], None]:
        def run() -> None:
            hf_cfg._experts_implementation = impl
            for block in layers_hf:
                block.gate.top_k = top_k
            run_hf()

        return run

    contenders = {
        "ours": run_ours,
        **{f"ours_{d}": sweep(v, x_TD) for d, v in layers_var.items()},
        **{
            f"hf_{impl}_{side}": run_hf_impl(impl_name, k)
            for impl, impl_name in (("eager", "eager"), ("grouped", "grouped_mm"))
            for side, k in (("lo", k_lo), ("hi", k_hi))
            if side == "lo" or k_hi > k_lo
        },
        **gemms,
    }
    if phase == "decode":
        contenders["read"] = lambda: buf_N.sum()
    names = list(contenders)
    rounds_run: list[dict[str, Sample]] = []
    with torch.inference_mode():
        for fn in contenders.values():  # warm-up
            fn()
        # Interleaved rounds until `rounds` of them are clean (or patience x rounds have run).
        while len(rounds_run) < patience * rounds and sum(map(_clean, rounds_run)) < rounds:
            k = len(rounds_run) % len(names)
            order = names[k:] + names[:k]  # no fixed position bias
            rounds_run.append({name: sample(contenders[name]) for name in order})
    clean_rounds = [r for r in rounds_run if _clean(r)]
    used = clean_rounds if len(clean_rounds) >= max(3, rounds // 2) else rounds_run

    n_ours, n_hf = len(layers_ours), len(layers_hf)
    weight_gb = work.weight_bytes / 1e9
    read_gb = buf_N.numel() * buf_N.element_size() / 1e9

    def per_round(fn: Callable[[dict[str, Sample]], float]) -> float:
        return statistics.median(fn(r) for r in used)

    def gemm_s(r: dict[str, Sample]) -> float:
        return min(r["gemm"].seconds, r["gemm_t"].seconds)

    def roof_s(r: dict[str, Sample]) -> float:
        if phase == "prefill":
            return gemm_s(r)
        return weight_gb / (read_gb / r["read"].seconds)

    def hf_s(r: dict[str, Sample]) -> float:
        return min(hf_impl_s(r, "eager"), hf_impl_s(r, "grouped"))

    def hf_impl_s(r: dict[str, Sample], impl: str) -> float:
        lo = r[f"hf_{impl}_lo"].seconds
        hi = r[f"hf_{impl}_hi"].seconds if k_hi > k_lo else lo  # a whole k runs once
        return (lo + frac_k * (hi - lo)) / n_hf

    def ours_s(r: dict[str, Sample]) -> float:
        return r["ours"].seconds / n_ours

    def var_roof_s(r: dict[str, Sample], d: str) -> float:
        nbytes = touched_bytes(variants[d][0], work.counts)
        if phase == "prefill":
            return float("nan")
        return nbytes / 1e9 / (read_gb / r["read"].seconds)

    def var_s(r: dict[str, Sample], d: str) -> float:
        return r[f"ours_{d}"].seconds / len(layers_var[d])

    # Times: medians over the rounds used; fractions and ratios: medians of per-round ratios,
    # which cancel load that slows a whole round (e.g. memory traffic of other machines).
    return Row(
        routing=routing,
        phase=phase,
        T=T,
        k_mean=work.k_mean,
        routed_k_mean=work.routed_k_mean,
        hf_top_k=f"{k_lo}-{k_hi}" if k_hi > k_lo else str(k_lo),
        touched=work.touched,
        gflop=work.flops / 1e9,
        weight_mb=work.weight_bytes / 1e6,
        ours_ms=per_round(ours_s) * 1e3,
        roof_ms=per_round(roof_s) * 1e3,
        gemm_ms=per_round(gemm_s) * 1e3,
        peak_ms=work.flops / peak_flops * 1e3,
        hf_eager_ms=per_round(lambda r: hf_impl_s(r, "eager")) * 1e3,
        hf_grouped_ms=per_round(lambda r: hf_impl_s(r, "grouped")) * 1e3,
        read_gbs=per_round(lambda r: read_gb / r["read"].seconds) if phase == "decode" else float("nan"),
        frac_roof=per_round(lambda r: roof_s(r) / ours_s(r)),
        frac_bound=per_round(lambda r: max(roof_s(r), gemm_s(r)) / ours_s(r)),
        vs_hf=per_round(lambda r: hf_s(r) / ours_s(r)),
        counts=work.counts,
        rounds=len(rounds_run),
        clean_rounds=len(clean_rounds),
        dtype_ms={d: per_round(lambda r, d=d: var_s(r, d)) * 1e3 for d in variants},
        dtype_roof_ms={d: per_round(lambda r, d=d: var_roof_s(r, d)) * 1e3 for d in variants},
        dtype_frac_roof={d: per_round(lambda r, d=d: var_roof_s(r, d) / var_s(r, d)) for d in variants},
        dtype_vs_fp32={d: per_round(lambda r, d=d: ours_s(r) / var_s(r, d)) for d in variants},
    )


def touched_bytes(layer: DCMoE, counts: tuple[int, ...]) -> int:
    """Bytes of the weights a forward with these routed counts reads, in their stored dtype."""
    total = layer.gate.weight.numel() * layer.gate.weight.element_size()
    total += sum(e.expert_weights().nbytes for e, c in zip(layer.routed_experts, counts) if c)
    return total + sum(e.expert_weights().nbytes for e in layer.shared_experts)


def _clean(r: dict[str, Sample]) -> bool:
    return all(smp.clean() for smp in r.values())


# ---------------------------------------------------------------- report


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'routing':8s} {'phase':7s} {'T':>6s} {'k':>5s} {'k_rt':>5s} {'hfk':>4s} {'touch':>5s} "
        f"{'GFLOP':>7s} {'MB':>6s} {'ours ms':>9s} {'roof ms':>9s} {'gemm ms':>9s} {'peak ms':>8s} "
        f"{'hf eager':>9s} {'hf grpd':>9s} {'roof/ours':>9s} {'bnd/ours':>8s} {'hf/ours':>7s} {'clean':>5s}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.routing:8s} {r.phase:7s} {r.T:6d} {r.k_mean:5.2f} {r.routed_k_mean:5.2f} "
            f"{r.hf_top_k:>4s} {r.touched:5d} {r.gflop:7.2f} {r.weight_mb:6.1f} {r.ours_ms:9.3f} "
            f"{r.roof_ms:9.3f} {r.gemm_ms:9.3f} {r.peak_ms:8.3f} {r.hf_eager_ms:9.3f} {r.hf_grouped_ms:9.3f} "
            f"{r.frac_roof:9.0%} {r.frac_bound:8.0%} {r.vs_hf:7.2f} {r.clean_rounds:>2d}/{r.rounds:<2d}"
        )


def print_dtype_table(rows: list[Row]) -> None:
    head = (
        f"{'routing':8s} {'phase':7s} {'T':>6s} {'experts':>7s} {'ms':>9s} {'roof ms':>9s} "
        f"{'roof/ours':>9s} {'fp32/this':>9s} {'hf/this':>7s}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        best_hf = min(r.hf_eager_ms, r.hf_grouped_ms)
        print(
            f"{r.routing:8s} {r.phase:7s} {r.T:6d} {'fp32':>7s} {r.ours_ms:9.3f} {r.roof_ms:9.3f} "
            f"{r.frac_roof:9.0%} {1.0:9.2f} {r.vs_hf:7.2f}"
        )
        for d, ms in r.dtype_ms.items():
            print(
                f"{r.routing:8s} {r.phase:7s} {r.T:6d} {d:>7s} {ms:9.3f} {r.dtype_roof_ms[d]:9.3f} "
                f"{r.dtype_frac_roof[d]:9.0%} {r.dtype_vs_fp32[d]:9.2f} {best_hf / ms:7.2f}"
            )


def print_kernels(selections: list[autotune.Selection]) -> None:
    if not selections:
        print(f"# expert kernels: dtype defaults {kernels.DEFAULT} ({autotune.ENV_MODE}={autotune.mode()})")
    for sel in selections:
        print(f"# expert kernels {sel.summary()}")
        for n, ms in sel.plan.ms.items():
            print(
                f"#     {n:5d} tokens: "
                + "  ".join(f"{k} {v:.3f}" for k, v in sorted(ms.items(), key=lambda kv: kv[1]))
            )


def progress(r: Row) -> None:
    print(
        f"#   {r.phase} T={r.T}: ours {r.ours_ms:.3f} ms, roof {r.roof_ms:.3f} ms, "
        f"transformers {min(r.hf_eager_ms, r.hf_grouped_ms):.3f} ms"
        + "".join(f", {d} {ms:.3f} ms" for d, ms in r.dtype_ms.items()),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no 16k prefill")
    ap.add_argument("--json", help="also write the rows and the environment to this file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help="decode layer stack (cold weights)")
    ap.add_argument("--skew-k", type=float, default=3.0, help="target mean k of the skewed routing")
    ap.add_argument("--routing", choices=("random", "skewed", "both"), default="both")
    ap.add_argument("--sizes", help="comma-separated subset of the sizes, e.g. 2,16,4096")
    ap.add_argument(
        "--patience", type=int, default=4, help="run up to this many times the wanted rounds to collect clean ones"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--expert-dtypes",
        default="bf16,int8",
        help="comma list of extra expert dtypes (bf16, int8) timed beside fp32; '' for none",
    )
    args = ap.parse_args()
    extra_dtypes = [d for d in args.expert_dtypes.split(",") if d]
    for d in extra_dtypes:
        if d not in ("bf16", "int8"):
            raise SystemExit(f"--expert-dtypes {d!r}: use bf16 and/or int8")

    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    model_cfg = get_preset("small")
    cfg, dim = model_cfg.moe, model_cfg.hidden_size

    buf_N = read_probe()  # 1 GiB in huge pages (benchmarks/machine.py)
    dst_N = torch.empty_like(buf_N)
    buf_N.sum()
    copy_gbs = max(copy_bandwidth(buf_N, dst_N) for _ in range(5))
    del dst_N
    peak_flops = peak_gemm_flops()

    ours = build_ours(cfg, dim, args.layers, args.seed)
    selections = []
    for layer in ours:
        convert_experts(layer, None, select=False)
    variants = {}
    for d in extra_dtypes:
        variants[d] = [convert_experts(copy.deepcopy(layer), d, select=False) for layer in ours]
        for v, layer in zip(variants[d], ours):
            v.gate = layer.gate  # one router: the routing (and set_gate_scale) is shared
    t0 = time.perf_counter()
    for layers in [ours, *variants.values()]:
        selections += autotune.select(nn.ModuleList(layers))
    print(f"# kernel selection {time.perf_counter() - t0:.1f} s", flush=True)
    print_kernels(selections)
    hf, hf_cfg = build_transformers(dim, cfg, args.layers, args.seed + 1)
    share_router(hf, ours[0], cfg.num_routed)
    for block in hf:
        move_to_hugepages(block)  # as ours (convert_experts): the same memory placement on both sides
    base_E_D = ours[0].gate.weight.detach().clone()
    routings = ["random", "skewed"] if args.routing == "both" else [args.routing]
    prefill = PREFILL[:2] if args.quick else PREFILL
    decode = DECODE
    if args.sizes:
        wanted = {int(x) for x in args.sizes.split(",")}
        prefill = tuple(T for T in PREFILL if T in wanted)
        decode = tuple(T for T in DECODE if T in wanted)
    rounds_prefill = {1024: 3 if args.quick else 9, 4096: 3 if args.quick else 5, 16384: 3}
    rounds_decode = 8 if args.quick else 25

    rows: list[Row] = []
    scales = {}
    for routing in routings:
        scale = 1.0
        if routing == "skewed":
            scale = find_gate_scale(ours[0], base_E_D, args.skew_k, dim)
        scales[routing] = scale
        set_gate_scale(ours, base_E_D, scale)
        print(f"# routing {routing}: router weight x {scale:.3f}", flush=True)
        for phase, T in [("decode", T) for T in decode] + [("prefill", T) for T in prefill]:
            rows.append(
                bench_size(
                    peak_flops=peak_flops,
                    routing=routing,
                    phase=phase,
                    T=T,
                    ours=ours,
                    hf=hf,
                    hf_cfg=hf_cfg,
                    cfg=cfg,
                    variants=variants,
                    dim=dim,
                    rounds=rounds_decode if phase == "decode" else rounds_prefill[T],
                    patience=args.patience,
                    buf_N=buf_N,
                    seed=args.seed,
                )
            )
            progress(rows[-1])

    reads = [r.read_gbs for r in rows if r.phase == "decode"]
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; memory: read "
        f"{statistics.median(reads) if reads else float('nan'):.1f} GB/s (median of decode rounds), copy {copy_gbs:.1f} GB/s (best of 5, read+write); "
        f"peak GEMM {peak_flops / 1e9:.0f} GFLOP/s (2048³, best of 5)"
    )
    print(
        "# roof: prefill = dense GEMMs of the activated FLOPs; decode = touched weights / read "
        "bandwidth. bnd = max(roof, gemm). hf/ours = best transformers block / ours (>1: ours faster)"
    )
    print_table(rows)
    if variants:
        print(
            "# expert dtypes: our layer with fp32 / bf16 / int8 experts (same routing); roof = touched bytes "
            "in that dtype / read bandwidth (decode); hf/this = best transformers fp32 block / this"
        )
        print_dtype_table(rows)
    print_kernels(selections)
    print(machine_line())
    if args.json:
        env = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "copy_gbs": copy_gbs,
            "peak_gflops": peak_flops / 1e9,
            "gate_scales": scales,
            "layers": args.layers,
            "quick": args.quick,
            "machine": kernel_cache.machine("cpu"),
            "loadavg_end": os.getloadavg(),
            "kernels": {
                str(s.key): {"source": s.plan.source, "limits": s.plan.limits, "names": s.plan.names, "ms": s.plan.ms}
                for s in selections
            },
        }
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
