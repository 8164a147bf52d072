"""Expert MLPs and the expert-backend interface that lets the same DCMoE layer run its routed
experts in-process or in Ray actors (unimoe_ray.parallel).

Shape legend: N token-expert assignments grouped by expert, n tokens of one expert, D model
dim, F expert FFN dim.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# At or below this many tokens an expert runs W·xᵀ (weights as the *left* GEMM operand,
# feature-major outputs) instead of nn.Linear's x·Wᵀ: MKL reads the weights 1.5-2x faster
# that way at 1-8 tokens. From SKINNY_ROUND to SKINNY_MAX_TOKENS tokens, W·xᵀ is fast only
# when the token count is a multiple of SKINNY_ROUND (MKL's AVX2 kernels take columns 8 at a
# time; other counts run 10-40% slower than either form), so the token columns are
# zero-padded up to one: a few wasted columns against a whole GEMM at the slow rate (below 8
# tokens padding costs more than it saves). Above, x·Wᵀ in blocks.
# (Measured on 2 AVX2 cores with benchmarks/moe_layer.py; figures in benchmarks/README.md.)
SKINNY_MAX_TOKENS = 64
SKINNY_ROUND = 8
# Above it, tokens go through in row blocks of about this size with one reused pair of
# gate/up buffers: GEMMs of ~1k rows already run at full speed, the buffers stay in the heap
# and the cache, where whole-expert (n × F) temporaries are fresh mmap'd pages every call.
BLOCK_TOKENS = 1024


class SwiGLU(nn.Module):
    """Qwen-style gated MLP: down(silu(gate(x)) * up(x)). Parameter names match the checkpoint."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_nD: torch.Tensor, out_nD: torch.Tensor | None = None) -> torch.Tensor:
        """y_nD (contiguous); written into `out_nD` instead when given (it is then returned)."""
        gate_FD, up_FD, down_DF = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if torch.is_grad_enabled() and (
            x_nD.requires_grad or gate_FD.requires_grad or up_FD.requires_grad or down_DF.requires_grad
        ):
            # Autograd: the plain ops (the fast paths below reuse buffers in place).
            y_nD = F.linear(F.silu(F.linear(x_nD, gate_FD)) * F.linear(x_nD, up_FD), down_DF)
            return y_nD if out_nD is None else out_nD.copy_(y_nD)
        if x_nD.shape[0] <= SKINNY_MAX_TOKENS and x_nD.device.type == "cpu":
            # The skinny form and its padding are tuned to MKL's CPU kernels; GPU BLAS picks
            # its own kernels for few rows.
            return _swiglu_skinny(x_nD, gate_FD, up_FD, down_DF, out_nD)
        return _swiglu_blocked(x_nD, gate_FD, up_FD, down_DF, out_nD)


def _swiglu_blocked(
    x_nD: torch.Tensor,
    gate_FD: torch.Tensor,
    up_FD: torch.Tensor,
    down_DF: torch.Tensor,
    out_nD: torch.Tensor | None,
) -> torch.Tensor:
    """SwiGLU for many tokens (no autograd), in equal row blocks of about BLOCK_TOKENS."""
    n, hidden = x_nD.shape[0], gate_FD.shape[0]
    if out_nD is None:
        out_nD = x_nD.new_empty(n, down_DF.shape[0])
    num_blocks = -(-n // BLOCK_TOKENS)
    rows = -(-n // num_blocks)
    g_bF = x_nD.new_empty(rows, hidden)
    u_bF = x_nD.new_empty(rows, hidden)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        g, u = g_bF[: stop - start], u_bF[: stop - start]
        torch.mm(x_nD[start:stop], gate_FD.t(), out=g)
        torch.mm(x_nD[start:stop], up_FD.t(), out=u)
        torch.mm(F.silu(g, inplace=True).mul_(u), down_DF.t(), out=out_nD[start:stop])
    return out_nD


def _swiglu_skinny(
    x_nD: torch.Tensor,
    gate_FD: torch.Tensor,
    up_FD: torch.Tensor,
    down_DF: torch.Tensor,
    out_nD: torch.Tensor | None,
) -> torch.Tensor:
    """SwiGLU for a few tokens (no autograd): W·xᵀ GEMMs on the token columns, padded as
    described at SKINNY_MAX_TOKENS; padding columns are dropped from the result."""
    n = x_nD.shape[0]
    cols = 2 if n == 1 else n if n <= SKINNY_ROUND else -(-n // SKINNY_ROUND) * SKINNY_ROUND
    if cols != n:
        # One token would take MKL's single-threaded GEMV (2 columns use every core); other
        # counts are padded with zero columns to a multiple of SKINNY_ROUND (see above).
        x_cD = x_nD.new_zeros(cols, x_nD.shape[1])
        x_cD[:n] = x_nD
        x_nD = x_cD
    x_Dn = x_nD.t()
    g_Fn = torch.mm(gate_FD, x_Dn)
    u_Fn = torch.mm(up_FD, x_Dn)
    # The down GEMM is fast with h token-major (its transpose as right operand): the product
    # is written transposed.
    h_nF = torch.empty(x_nD.shape[0], gate_FD.shape[0], dtype=x_nD.dtype, device=x_nD.device)
    torch.mul(F.silu(g_Fn, inplace=True), u_Fn, out=h_nF.t())
    y_nD = torch.mm(down_DF, h_nF.t()).t()[:n]
    return y_nD.contiguous() if out_nD is None else out_nD.copy_(y_nD)


class ExpertBackend(Protocol):
    """Runs one layer's routed experts on tokens already grouped by expert.

    `x_ND` holds expert 0's `counts[0]` tokens, then expert 1's, ...; the result has the same
    layout and is the caller's to modify (DCMoE scales it in place). Experts with a zero count
    must cost nothing.
    """

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor: ...


def run_grouped(experts: Sequence[SwiGLU], x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Each expert once, on its contiguous slice of x_ND (one GEMM chain per active expert),
    writing straight into its slice of the result."""
    y_ND = torch.empty_like(x_ND)
    start = 0
    for expert, n in zip(experts, counts):
        if n:
            expert(x_ND[start : start + n], out_nD=y_ND[start : start + n])
            start += n
    return y_ND


class LocalExperts:
    """The in-process backend: the layer's own `routed_experts` modules."""

    def __init__(self, experts: nn.ModuleList) -> None:
        self.experts = experts

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return run_grouped(self.experts, x_ND, counts)
