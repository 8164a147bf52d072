"""The DCMoE block (docs/DESIGN.md §1): router over routed + null + shared experts, Top-P (or Top-K)
selection, sparse dispatch to routed experts through an expert backend, null expert (no
compute), shared experts on every token. Plus the dense FFN used by specialists.

Shape legend: T tokens, D model dim, E router width (routed + null + shared),
R dynamic experts (routed + null), S shared experts, N routed assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unimoe_ray.config import MoEConfig
from unimoe_ray.model import dispatch, router
from unimoe_ray.model.experts import ExpertBackend, LocalExperts, SwiGLU


@dataclass(frozen=True)
class MoEStats:
    """Routing statistics of one layer for one forward.

    aux_loss: load-balancing loss (scalar; 0 under torch.inference_mode, where nothing trains). k_T: experts chosen per token (routed + null).
    mask_TR: which dynamic experts each token chose. counts: tokens per routed expert.
    """

    aux_loss: torch.Tensor
    k_T: torch.Tensor
    mask_TR: torch.Tensor
    counts: tuple[int, ...]


class DCMoE(nn.Module):
    """Dynamic-Capacity MoE FFN. Parameter names follow the released checkpoint via
    unimoe_ray.checkpoint's name map: gate, routed_experts.{k}, shared_experts.{j}."""

    def __init__(self, *, dim: int, cfg: MoEConfig, layer_idx: int = 0) -> None:
        super().__init__()
        if cfg.mode == "dense":
            raise ValueError("DCMoE needs mode 'top_p' or 'top_k'; use DenseFFN for 'dense'")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.routed_experts = nn.ModuleList(
            SwiGLU(dim=dim, hidden=cfg.routed_intermediate) for _ in range(cfg.num_routed)
        )
        self.shared_experts = nn.ModuleList(
            SwiGLU(dim=dim, hidden=cfg.shared_intermediate) for _ in range(cfg.num_shared)
        )
        self.expert_backend: ExpertBackend = LocalExperts(self.routed_experts)
        self._shared_backend = LocalExperts(self.shared_experts)  # for its layer-level kernels

    # At inference the released code computes the router in the model's dtype (its fp32 gate
    # applies in training only); set_router_precision(model, "model") reproduces that.
    fp32_router_at_inference: bool = True

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """logits_TE, in fp32 when `fp32_gate` (routing decisions are precision-sensitive) in
        training, and at inference unless the router precision is set to the model's dtype."""
        cfg = self.cfg
        if self.training:
            x_TD = router.jitter(x_TD, cfg.input_jitter)
        w_ED = self.gate.weight
        if cfg.fp32_gate and (self.training or self.fp32_router_at_inference):
            if x_TD.dtype == w_ED.dtype == torch.float32 and not torch.is_autocast_enabled(x_TD.device.type):
                logits_TE = F.linear(x_TD, w_ED)  # already fp32 (a decode step: no casts, no context)
            else:
                # Autocast (bf16 training) would run this linear in bf16 again: turn it off here.
                with torch.autocast(x_TD.device.type, enabled=False):
                    logits_TE = F.linear(x_TD.float(), w_ED.float())
        else:
            logits_TE = self.gate(x_TD)
        if self.training:
            logits_TE = router.jitter(logits_TE, cfg.router_jitter)
        return logits_TE

    def route(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> router.Routing:
        cfg = self.cfg
        cap = None
        if cfg.token_drop:
            cap = router.capacity(x_TD.shape[0], cfg.num_dynamic, cfg.capacity_factor, cfg.min_capacity)
        return router.route(
            self.router_logits(x_TD),
            num_dynamic=cfg.num_dynamic,
            mode=cfg.mode,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            weighting=cfg.weighting,
            sparsemixer_eps=cfg.router_jitter,
            token_capacity=cap,
            valid_T=valid_T,
            differentiable=self.training and not cfg.ignore_differentiable_router,
        )

    def _shared_layer(self, x_TD: torch.Tensor, shared_TS: torch.Tensor) -> torch.Tensor | None:
        """Σ_j shared_j(x) · weight_j with every shared expert in one layer-level call (each on
        its own copy of the tokens) where `LocalExperts.layer_kernel` has one for T tokens;
        else None (the loop in `forward` runs)."""
        num, T = len(self.shared_experts), x_TD.shape[0]
        layer = self._shared_backend.layer_kernel((T,) * num) if num > 1 else None
        if layer is None:
            return None
        y_ND = layer(x_TD.repeat(num, 1))
        # The loop's order: expert 0 scaled, then each further one added scaled.
        out_TD = y_ND[:T].mul_(shared_TS[:, :1])
        for j in range(1, num):
            out_TD.addcmul_(shared_TS[:, j : j + 1], y_ND[j * T : (j + 1) * T])
        return out_TD

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x_TD → (out_TD, stats). `valid_T` (bool) keeps padding out of the aux loss."""
        routing = self.route(x_TD, valid_T)
        plan = dispatch.plan_dispatch(routing.mask_TR, routing.weights_TR, self.cfg.num_routed)
        # Shared experts first: their weighted sum becomes the output buffer that the routed
        # experts are scatter-added into (no zero-filled buffer, no extra full-size adds).
        shared_TS = routing.shared_weights_TS.to(x_TD.dtype)
        out_TD = self._shared_layer(x_TD, shared_TS)
        for j, expert in enumerate(self.shared_experts if out_TD is None else ()):
            if out_TD is None and not torch.is_grad_enabled():
                # The first shared expert writes straight into the output buffer.
                out_TD = expert(x_TD, out_nD=torch.empty_like(x_TD)).mul_(shared_TS[:, j : j + 1])
            elif out_TD is None:
                out_TD = expert(x_TD) * shared_TS[:, j : j + 1]
            else:
                out_TD = out_TD.addcmul_(shared_TS[:, j : j + 1], expert(x_TD))
        if out_TD is None:
            out_TD = torch.zeros_like(x_TD)
        # A collective backend (expert parallelism over ranks) runs on every rank for every
        # layer, also with no routed tokens here: its peers are waiting in the exchange.
        if plan.token_idx_N.numel() or getattr(self.expert_backend, "collective", False):
            x_ND = dispatch.gather_tokens(x_TD, plan)
            y_ND = self.expert_backend.run(self.layer_idx, x_ND, plan.counts)
            dispatch.combine(out_TD, y_ND, plan)
        stats = MoEStats(aux_loss=routing.aux_loss, k_T=routing.k_T, mask_TR=routing.mask_TR, counts=plan.counts)
        return out_TD, stats


class DenseFFN(SwiGLU):
    """Dense FFN (stage-1 specialists, the Unify-Dense ablation); same call signature as DCMoE."""

    def __init__(self, *, dim: int, cfg: MoEConfig, layer_idx: int = 0) -> None:
        super().__init__(dim=dim, hidden=cfg.dense_intermediate)
        self.layer_idx = layer_idx

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return super().forward(x_TD), None


def set_router_precision(model: nn.Module, precision: str) -> None:
    """Router precision at inference for every DCMoE in `model`: "fp32" or "model" (the
    model's dtype, as the released inference code)."""
    if precision not in ("fp32", "model"):
        raise ValueError(f"router precision {precision!r}: use 'fp32' or 'model'")
    for m in model.modules():
        if isinstance(m, DCMoE):
            m.fp32_router_at_inference = precision == "fp32"


def build_ffn(*, dim: int, cfg: MoEConfig, layer_idx: int) -> DCMoE | DenseFFN:
    """The FFN of one decoder layer for the configured mode."""
    if cfg.mode == "dense":
        return DenseFFN(dim=dim, cfg=cfg, layer_idx=layer_idx)
    return DCMoE(dim=dim, cfg=cfg, layer_idx=layer_idx)
