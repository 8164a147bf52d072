"""Sparse token dispatch: group tokens by routed expert, and scatter-add the weighted expert
outputs back. Every routed expert runs once, on exactly its tokens; the null expert costs
nothing; no per-token loops, no dense fallback.

Shape legend: T tokens, D model dim, R dynamic experts (routed + null), N token-expert
assignments to routed experts (Σ counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """Token-expert assignments sorted by expert.

    token_idx_N: token of each assignment, grouped by expert (expert 0's tokens first).
    weight_N: combine weight of each assignment.
    counts: tokens per routed expert (Python ints: they size the per-expert GEMMs).
    """

    token_idx_N: torch.Tensor
    weight_N: torch.Tensor
    counts: tuple[int, ...]


def plan_dispatch(mask_TR: torch.Tensor, weights_TR: torch.Tensor, num_routed: int) -> DispatchPlan:
    """Assignments to routed experts only: null-expert picks produce no work."""
    routed_mask_RT = mask_TR[:, :num_routed].t()
    # nonzero() walks (expert, token) in row-major order, so the result is grouped by expert.
    expert_idx_N, token_idx_N = routed_mask_RT.nonzero(as_tuple=True)
    counts = torch.bincount(expert_idx_N, minlength=num_routed)
    weight_N = weights_TR[token_idx_N, expert_idx_N]
    return DispatchPlan(token_idx_N=token_idx_N, weight_N=weight_N, counts=tuple(counts.tolist()))


def gather_tokens(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x_ND: the hidden state of each assignment, grouped by expert."""
    return x_TD.index_select(0, plan.token_idx_N)


def combine(out_TD: torch.Tensor, y_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """out_TD += Σ_assignments weight · expert output, in place; returns out_TD.

    Without autograd, y_ND is scaled in place: a fresh N × D product would cost more in page
    faults than the multiply itself at prefill sizes.
    """
    weight_N1 = plan.weight_N[:, None].to(y_ND.dtype)
    if torch.is_grad_enabled() and (y_ND.requires_grad or weight_N1.requires_grad):
        return out_TD.index_add_(0, plan.token_idx_N, y_ND * weight_N1)
    return out_TD.index_add_(0, plan.token_idx_N, y_ND.mul_(weight_N1))
