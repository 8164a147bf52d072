"""The training step: one optimiser update over an accumulation window of micro-batches.
Torch only (torch.distributed when a process group is up; never Ray): `train/loop.py` calls
it, never the reverse.

Loss (docs/DESIGN.md §1): Σ over codebooks of the cross-entropy at that codebook's labelled
positions + aux_weight · aux (the load-balancing loss, averaged over layers). The CE of
codebook k is normalised by its labelled-token count over the *whole* window on *all*
workers (all-reduced before backward), so W DDP workers × A micro-batches give the same
gradient as one worker on the union of their batches. (The aux loss is a per-batch
statistic; only with aux weight 0 are the two exactly equal.)

Shape legend: B batch, L length, K codebooks, V codec vocab, T tokens, D model dim.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unimoe_ray.model.unimoe_audio import IGNORE_INDEX, UniMoEAudio
from unimoe_ray.train.batches import Batch
from unimoe_ray.train.routing import RoutingTally


class LossModule(nn.Module):
    """Model + loss in one forward (what DDP / DeepSpeed wrap). Returns per-codebook CE *sums*
    over this micro-batch's labelled positions, their counts, the aux loss and the MoE stats."""

    def __init__(self, model: UniMoEAudio) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch):
        kw = batch.model_kwargs()
        labels_BKL = kw.pop("labels_BKL")
        out = self.model(**kw, return_logits=False)
        cfg = self.model.cfg
        K, V = cfg.codec_channels, cfg.codec_vocab_size
        labels_TK = labels_BKL.transpose(1, 2).reshape(-1, K)
        rows_T = (labels_TK != IGNORE_INDEX).any(-1)
        h_TD = out.hidden_BLD.reshape(-1, out.hidden_BLD.shape[-1])[rows_T]
        labels_TK = labels_TK[rows_T]
        logits_TKV = self.model.codec_head(h_TD).view(-1, K, V).float()
        ce_sum_K = (
            F.cross_entropy(
                logits_TKV.reshape(-1, V), labels_TK.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            )
            .view(-1, K)
            .sum(0)
        )
        count_K = (labels_TK != IGNORE_INDEX).sum(0)
        return ce_sum_K, count_K, out.aux_loss, out.moe_stats


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast when asked (router logits stay fp32 inside DCMoE); else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class StepResult:
    """What one optimiser step did (global values: summed / averaged over all workers)."""

    loss: float  # ce + aux_weight · aux
    ce: float  # Σ_k per-codebook CE
    aux: float  # unweighted aux loss (mean over micro-batches and workers)
    aux_weight: float
    codec_ce_K: list[float]
    grad_norm: float
    tokens: int  # real (unpadded) tokens
    label_tokens: int  # positions with a codebook-0 label
    skipped: bool = False
    cause: str = ""
    routing: RoutingTally | None = None
    sample_ids: list[str] = field(default_factory=list)


def train_step(
    backend,
    micro_batches: list[Batch],
    *,
    aux_weight: float,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device = torch.device("cpu"),
) -> StepResult:
    """Forward/backward every micro-batch of the window, then one optimiser step.

    A non-finite loss on any worker skips the rest of the window and the update on every
    worker (they agree through an all-reduce, so none hangs in a collective)."""
    module: UniMoEAudio = backend.module.model
    K = module.cfg.codec_channels
    W = world_size()
    # Label counts over the whole window and all workers, before any backward.
    count_K = torch.zeros(K, dtype=torch.float64)
    tokens = 0
    for b in micro_batches:
        count_K += (b.labels_BKL != IGNORE_INDEX).sum(dim=(0, 2)).double()
        tokens += b.num_tokens
    totals = _all_reduce(torch.cat([count_K, torch.tensor([float(tokens)], dtype=torch.float64)]))
    denom_K = totals[:K].clamp_min(1.0).float().to(device)
    tokens_global = int(totals[K])

    ce_K = torch.zeros(K)
    aux_total = 0.0
    tally = RoutingTally.empty(module.cfg)
    skipped, cause = False, ""
    A = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device)
        with backend.context(last=i == A - 1):
            with autocast_context(device, autocast_dtype):
                ce_sum_K, _, aux, stats = backend.model(batch)
            ce_part_K = ce_sum_K.float() / denom_K
            # × W: DDP / DeepSpeed average gradients over workers; the CE is already global.
            loss = ce_part_K.sum() * W + aux_weight * aux.float() / A
            finite = torch.tensor([float(torch.isfinite(loss))])
            if float(_all_reduce(finite, dist.ReduceOp.MIN if W > 1 else None)) < 1.0:
                skipped = True
                cause = _cause(ce_part_K, aux)
                break
            backend.backward(loss)
        ce_K += ce_part_K.detach().cpu()
        aux_total += float(aux.detach()) / A
        tally.add(stats, batch.attention_mask_BL.reshape(-1).cpu())
    if skipped:
        backend.skip()
        return StepResult(
            loss=float("nan"),
            ce=float("nan"),
            aux=float("nan"),
            aux_weight=aux_weight,
            codec_ce_K=[float("nan")] * K,
            grad_norm=float("nan"),
            tokens=tokens_global,
            label_tokens=int(totals[0]),
            skipped=True,
            cause=cause,
        )
    grad_norm = backend.step()
    summed = _all_reduce(torch.cat([ce_K, torch.tensor([aux_total])]))
    ce_K, aux_mean = summed[:K], float(summed[K]) / W
    tally.all_reduce()
    return StepResult(
        loss=float(ce_K.sum()) + aux_weight * aux_mean,
        ce=float(ce_K.sum()),
        aux=aux_mean,
        aux_weight=aux_weight,
        codec_ce_K=ce_K.tolist(),
        grad_norm=grad_norm,
        tokens=tokens_global,
        label_tokens=int(totals[0]),
        routing=tally,
        sample_ids=[s for b in micro_batches for s in b.sample_ids],
    )


def _cause(ce_part_K: torch.Tensor, aux: torch.Tensor) -> str:
    bad = [k for k, v in enumerate(ce_part_K.tolist()) if not math.isfinite(v)]
    parts = []
    if bad:
        parts.append(f"codec cross-entropy non-finite on codebooks {bad}")
    if not bool(torch.isfinite(aux)):
        parts.append("aux load-balancing loss non-finite")
    if not parts:
        parts.append("non-finite loss on another worker")
    return "; ".join(parts)


@torch.no_grad()
def evaluate(
    module: UniMoEAudio,
    batches: list[Batch],
    *,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:
    """Validation loss per task: Σ_k CE_k with each codebook's CE averaged over that task's
    labelled positions. Every worker evaluates the same rows (no collectives, ZeRO-3 safe)."""
    lm = LossModule(module)
    was_training = module.training
    module.eval()
    K = module.cfg.codec_channels
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for batch in batches:
        # One task per evaluation batch (the loop groups them so) keeps sums per task exact.
        task = batch.tasks[0]
        with autocast_context(device, autocast_dtype):
            ce_sum_K, count_K, _, _ = lm(batch.to(device))
        sums[task] = sums.get(task, torch.zeros(K, dtype=torch.float64)) + ce_sum_K.double().cpu()
        counts[task] = counts.get(task, torch.zeros(K, dtype=torch.float64)) + count_K.double().cpu()
    module.train(was_training)
    return {t: float((sums[t] / counts[t].clamp_min(1.0)).sum()) for t in sorted(sums)}
