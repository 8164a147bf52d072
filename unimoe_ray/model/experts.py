"""Expert MLPs and the expert-backend interface that lets the same DCMoE layer run its routed
experts in-process or in Ray actors (unimoe_ray.parallel).

Shape legend: N token-expert assignments grouped by expert, n tokens of one expert, D model
dim, F expert FFN dim.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unimoe_ray.model import kernel_plans, kernels


class SwiGLU(nn.Module):
    """Qwen-style gated MLP: down(silu(gate(x)) * up(x)). Parameter names match the checkpoint.

    Without autograd it runs this machine's chosen kernel (unimoe_ray.model.kernel_plans) on its
    weights in fp32 or bf16; int8 weights live in unimoe_ray.model.quantize.Int8SwiGLU.
    """

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self._packed: tuple[tuple, kernels.ExpertWeights] | None = None

    def expert_weights(self) -> kernels.ExpertWeights:
        """The weights in kernel form; rebuilt only when a parameter's storage changed
        (`.to()`, loading, `fuse_gate_up`)."""
        mods = self._modules  # not nn.Module.__getattr__: this runs once per expert call
        g = mods["gate_proj"]._parameters["weight"]
        u = mods["up_proj"]._parameters["weight"]
        d = mods["down_proj"]._parameters["weight"]
        sig = (g.data_ptr(), u.data_ptr(), d.data_ptr(), g.dtype, g.device, g.shape, d.shape)
        if self._packed is None or self._packed[0] != sig:
            self._packed = (sig, kernels.float_weights(g.detach(), u.detach(), d.detach()))
        return self._packed[1]

    def fuse_gate_up(self, dtype: torch.dtype | None = None) -> None:
        """Put gate and up in one (2F, D) buffer (the parameters become views of its halves),
        in `dtype` if given: the fused kernels then compute both in one GEMM. Inference set-up:
        optimisers built before hold the old tensors."""
        g, u = self.gate_proj.weight, self.up_proj.weight
        dtype = dtype or g.dtype
        if kernels.adjacent_rows(g, u) is not None and g.dtype == dtype:
            return
        with torch.no_grad():
            gate_up_2FD = torch.cat([g.detach(), u.detach()]).to(dtype)
        hidden = g.shape[0]
        self.gate_proj.weight = nn.Parameter(gate_up_2FD[:hidden], requires_grad=g.requires_grad)
        self.up_proj.weight = nn.Parameter(gate_up_2FD[hidden:], requires_grad=u.requires_grad)

    def forward(self, x_nD: torch.Tensor, out_nD: torch.Tensor | None = None) -> torch.Tensor:
        """y_nD (contiguous, x's dtype); written into `out_nD` instead when given (then returned)."""
        gate_FD, up_FD, down_DF = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if torch.is_grad_enabled() and (
            x_nD.requires_grad or gate_FD.requires_grad or up_FD.requires_grad or down_DF.requires_grad
        ):
            # Autograd: the plain ops (the kernels reuse buffers in place).
            xw = x_nD.to(gate_FD.dtype)
            y_nD = F.linear(F.silu(F.linear(xw, gate_FD)) * F.linear(xw, up_FD), down_DF).to(x_nD.dtype)
            return y_nD if out_nD is None else out_nD.copy_(y_nD)
        return kernel_plans.swiglu(self.expert_weights(), x_nD, out_nD)

    def __getstate__(self) -> dict:
        # The kernel-form cache holds views of this module's parameters: never pickle/copy it.
        state = dict(self.__dict__)
        state["_packed"] = None
        return state


class ExpertBackend(Protocol):
    """Runs one layer's routed experts on tokens already grouped by expert.

    `x_ND` holds expert 0's `counts[0]` tokens, then expert 1's, ...; the result has the same
    layout and is the caller's to modify (DCMoE scales it in place). Experts with a zero count
    must cost nothing. A backend with a true `collective` attribute (ranks exchanging tokens,
    unimoe_ray.model.expert_parallel) is called for every layer, also with no rows.
    """

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor: ...


def run_grouped(experts: Sequence[SwiGLU], x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Each expert once, on its contiguous slice of x_ND (one GEMM chain per active expert),
    writing straight into its slice of the result.

    Without autograd the kernels are called directly (what each expert's forward would do
    then): at decode sizes nn.Module's call machinery cost ~25 µs per expert, as much as a
    small expert's GEMMs. Experts with forward hooks still go through their module call."""
    y_ND = torch.empty_like(x_ND)
    direct = not torch.is_grad_enabled()
    start = 0
    for expert, n in zip(experts, counts):
        if n:
            x_nD, out_nD = x_ND[start : start + n], y_ND[start : start + n]
            if direct and not (expert._forward_hooks or expert._forward_pre_hooks):
                kernel_plans.swiglu(expert.expert_weights(), x_nD, out_nD)
            else:
                expert(x_nD, out_nD=out_nD)
            start += n
    return y_ND


def stack_experts(experts: Sequence[SwiGLU], dtype: torch.dtype | None = None) -> None:
    """Put a layer's experts' weights in two stacked buffers, gate and up of all experts as
    (E, 2F, D), down as (E, D, F) — the parameters become views of them, in `dtype` if given —
    so that `LocalExperts` can run the whole layer in two grouped GEMMs. Inference set-up (as
    `SwiGLU.fuse_gate_up`, which this includes); experts of different shapes are left alone."""
    mods = list(experts)
    if not mods or not all(type(m) is SwiGLU for m in mods):
        return
    g0, d0 = mods[0].gate_proj.weight, mods[0].down_proj.weight
    if any(m.gate_proj.weight.shape != g0.shape or m.down_proj.weight.shape != d0.shape for m in mods):
        return
    dtype = dtype or g0.dtype
    with torch.no_grad():
        gate_up_E2FD = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in mods]).to(dtype)
        down_EDF = torch.stack([m.down_proj.weight for m in mods]).to(dtype)
    hidden = g0.shape[0]
    for e, m in enumerate(mods):
        for lin, w in (
            (m.gate_proj, gate_up_E2FD[e, :hidden]),
            (m.up_proj, gate_up_E2FD[e, hidden:]),
            (m.down_proj, down_EDF[e]),
        ):
            lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)


class LocalExperts:
    """The in-process backend: the layer's own `routed_experts` modules (DCMoE also keeps one
    over its shared experts). Without autograd, where `layer_kernel` has a layer form for the
    counts (stacked float experts measured fastest "grouped", or int8 experts on torch's int8
    matmul), all experts run in one call; otherwise expert by expert (`run_grouped`)."""

    def __init__(self, experts: nn.ModuleList) -> None:
        self.experts = experts
        self._stack: tuple[tuple, tuple[torch.Tensor, torch.Tensor] | None] = ((), None)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up_E2FD, down_EDF) views over the experts' weights when they lie stacked in
        memory, else None. Re-derived whenever an expert's kernel-form weights change."""
        mods = list(self.experts)
        if not all(type(m) is SwiGLU for m in mods):
            return None
        ws = [m.expert_weights() for m in mods]
        key = tuple(map(id, ws))
        if self._stack[0] != key:
            self._stack = (key, kernels.stacked_views(ws))
        return self._stack[1]

    def __getstate__(self) -> dict:
        # The views are derived state: never pickle or deep-copy them (a copy re-derives its own).
        return {**self.__dict__, "_stack": ((), None)}

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        layer = self.layer_kernel(counts)
        return layer(x_ND) if layer is not None else run_grouped(self.experts, x_ND, counts)

    def layer_kernel(self, counts: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A call that runs all these experts at once on x_ND (rows grouped by expert as
        `counts` say), or None where the per-expert loop must run: with autograd or hooks, or
        where this machine's measured choice has no layer form. Layer forms: "grouped" (float
        experts stacked in memory, measured fastest at every active count) and the int8
        kernels (`kernels.int8_layer`: the per-expert kernel's arithmetic, casts once per layer).
        The plan is asked first: on machines where the loop won, the answer costs one lookup."""
        if torch.is_grad_enabled() or not len(self.experts) or not hasattr(self.experts[0], "expert_weights"):
            return None
        w0 = self.experts[0].expert_weights()
        grouped = kernel_plans.grouped_applies(w0, counts)
        act = None if grouped else kernel_plans.int8_layer_dtype(w0, counts)
        if not grouped and act is None:
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.experts):
            return None
        if grouped:
            stack = self.stacked()
            return None if stack is None else (lambda x_ND: kernels.grouped_swiglu(*stack, x_ND, counts))
        ws = [m.expert_weights() for m, n in zip(self.experts, counts) if n]
        active = [n for n in counts if n]
        if any(w.key != w0.key for w in ws):
            return None
        return lambda x_ND: kernels.int8_layer(ws, x_ND, active, act)
