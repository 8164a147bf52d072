"""Expert MLPs and the expert-backend interface that lets the same DCMoE layer run its routed
experts in-process or in Ray actors (unimoe_ray.parallel).

Shape legend: N token-expert assignments grouped by expert, D model dim, F expert FFN dim.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Qwen-style gated MLP: down(silu(gate(x)) * up(x)). Parameter names match the checkpoint."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND))


class ExpertBackend(Protocol):
    """Runs one layer's routed experts on tokens already grouped by expert.

    `x_ND` holds expert 0's `counts[0]` tokens, then expert 1's, ...; the result has the same
    layout. Experts with a zero count must cost nothing.
    """

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor: ...


def run_grouped(experts: Sequence[nn.Module], x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Each expert once, on its contiguous slice of x_ND (one GEMM chain per active expert)."""
    y_ND = torch.empty_like(x_ND)
    start = 0
    for expert, n in zip(experts, counts):
        if n:
            y_ND[start : start + n] = expert(x_ND[start : start + n])
            start += n
    return y_ND


class LocalExperts:
    """The in-process backend: the layer's own `routed_experts` modules."""

    def __init__(self, experts: nn.ModuleList) -> None:
        self.experts = experts

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return run_grouped(self.experts, x_ND, counts)
