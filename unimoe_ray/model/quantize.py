"""Expert weights in fewer bytes for inference: int8 weight-only (per-output-channel scales) or
bf16, chosen at load (`AudioGenerator.load(..., expert_dtype=...)`, `--expert-dtype`).

A decode step reads every touched expert's weights once per layer and does little arithmetic
on them, so its time is bytes ÷ memory bandwidth: bf16 halves the expert bytes, int8 quarters
them. Only the experts (routed and shared: ~90% of a decode step's bytes) change; attention,
router, embeddings and the codec head keep the model's dtype, and activations stay in it
between kernels. The quality cost is measured by benchmarks/decode_step.py --quality.

Shape legend: N output channels, K input channels, D model dim, F expert FFN dim.
"""

from __future__ import annotations

import torch
from torch import nn

from unimoe_ray.model import autotune, kernel_plans, kernels
from unimoe_ray.model.attention import fuse_qkv
from unimoe_ray.model.experts import SwiGLU, stack_experts
from unimoe_ray.model.hugepages import move_to_hugepages

EXPERT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def quantize_int8(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: q_NK = round(w / scale_N), scale_N = max|w_n·| / 127,
    so w ≈ q · scale with |error| ≤ scale / 2 per entry. An all-zero row gets scale 1 (q = 0)."""
    w_NK = w_NK.detach().float()
    amax_N = w_NK.abs().amax(dim=1)
    scale_N = torch.where(amax_N > 0, amax_N / 127.0, torch.ones_like(amax_N))
    q_NK = torch.round(w_NK / scale_N[:, None]).clamp_(-127, 127).to(torch.int8)
    return q_NK.contiguous(), scale_N.contiguous()


class Int8SwiGLU(nn.Module):
    """A SwiGLU expert with int8 weights (inference only): gate and up quantised into one
    (2F, D) int8 buffer, down (D, F), fp32 scales per output channel. Same call as SwiGLU."""

    def __init__(self, *, dim: int, hidden: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("gate_up_q", torch.zeros(2 * hidden, dim, dtype=torch.int8, device=device))
        self.register_buffer("gate_up_scale", torch.ones(2 * hidden, device=device))
        self.register_buffer("down_q", torch.zeros(dim, hidden, dtype=torch.int8, device=device))
        self.register_buffer("down_scale", torch.ones(dim, device=device))
        self._packed: tuple[tuple, kernels.ExpertWeights] | None = None

    @classmethod
    def from_float(cls, mlp: SwiGLU) -> "Int8SwiGLU":
        g = mlp.gate_proj.weight
        hidden, dim = g.shape
        q = cls(dim=dim, hidden=hidden, device=g.device)
        with torch.no_grad():
            gq, gs = quantize_int8(torch.cat([g, mlp.up_proj.weight]))
            dq, ds = quantize_int8(mlp.down_proj.weight)
            q.gate_up_q.copy_(gq)
            q.gate_up_scale.copy_(gs)
            q.down_q.copy_(dq)
            q.down_scale.copy_(ds)
        return q

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_FD, up_FD, down_DF) in fp32, as the int8 values represent them."""
        gu = self.gate_up_q.float() * self.gate_up_scale[:, None]
        hidden = gu.shape[0] // 2
        return gu[:hidden], gu[hidden:], self.down_q.float() * self.down_scale[:, None]

    def expert_weights(self) -> kernels.ExpertWeights:
        q, d = self.gate_up_q, self.down_q
        sig = (q.data_ptr(), d.data_ptr(), self.gate_up_scale.data_ptr(), self.down_scale.data_ptr(), q.device)
        if self._packed is None or self._packed[0] != sig:
            hidden = q.shape[0] // 2
            self._packed = (
                sig,
                kernels.ExpertWeights(
                    dtype="int8",
                    gate_FD=q[:hidden],
                    up_FD=q[hidden:],
                    down_DF=d,
                    gate_up_2FD=q,
                    scale_gate_up_2F=self.gate_up_scale,
                    scale_down_D=self.down_scale,
                    scale_gate_up_bf16_2F=self.gate_up_scale.to(torch.bfloat16),
                    scale_down_bf16_D=self.down_scale.to(torch.bfloat16),
                ),
            )
        return self._packed[1]

    def forward(self, x_nD: torch.Tensor, out_nD: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and x_nD.requires_grad:
            raise RuntimeError(
                "int8 experts are inference-only (no gradient through quantised weights): load "
                "the model with expert_dtype='fp32' (or None) to train"
            )
        return kernel_plans.swiglu(self.expert_weights(), x_nD, out_nD)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packed"] = None
        return state


def expert_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ModuleLists holding a DCMoE layer's routed and shared experts."""
    from unimoe_ray.model.moe import DCMoE

    lists = []
    for m in model.modules():
        if isinstance(m, DCMoE):
            lists += [m.routed_experts, m.shared_experts]
    return lists


def convert_experts(
    model: nn.Module, dtype: str | torch.dtype | None, *, select: bool = True, hugepages: bool = True
) -> nn.Module:
    """The one place a model is prepared for inference (`AudioGenerator.load` calls it after
    `load_pretrained`). Store every DCMoE expert of `model` in `dtype` ("fp32" | "bf16" | "int8";
    None keeps the loaded dtype), each layer's experts stacked (gate and up in one buffer), each
    attention's q/k/v in one buffer (`Attention.fuse_qkv`), move the model's CPU weights into
    huge pages (`hugepages.move_to_hugepages`; UNIMOE_HUGEPAGES=0 turns it off), then pick this
    machine's fastest expert kernels (`autotune.select`: measured once per shape on the model's
    device and cached; skipped under UNIMOE_KERNELS=default). In place; returns the model. For
    inference: int8 experts take no gradient, and a converted model's state dict holds the
    converted tensors.
    """
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in EXPERT_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"expert dtype {dtype} not supported: use one of {sorted(EXPERT_DTYPES)}")
        dtype = names[dtype]
    if dtype is not None and dtype not in EXPERT_DTYPES:
        raise ValueError(
            f"expert_dtype={dtype!r}: use one of {sorted(EXPERT_DTYPES)} (or None to keep the loaded dtype)"
        )
    for experts in expert_lists(model):
        if dtype != "int8":
            # Float experts: each layer's in two stacked buffers (gate+up, down), in `dtype`.
            stack_experts(experts, EXPERT_DTYPES[dtype] if dtype else None)
        for i, expert in enumerate(experts):
            if isinstance(expert, Int8SwiGLU):
                if dtype not in (None, "int8"):
                    raise ValueError(
                        f"experts already int8 cannot become {dtype} (the full-precision weights are "
                        "gone): load the checkpoint again"
                    )
                continue
            if dtype == "int8":
                experts[i] = Int8SwiGLU.from_float(expert)
            else:
                expert.fuse_gate_up(EXPERT_DTYPES[dtype] if dtype else None)
                if dtype:
                    expert.down_proj.to(EXPERT_DTYPES[dtype])
    fuse_qkv(model)  # the rest of the inference set-up: q/k/v in one buffer per attention
    if hugepages:
        move_to_hugepages(model)
    if select:
        autotune.select(model)
    return model


def expert_dtype(model: nn.Module) -> str:
    """The storage dtype of the model's experts ("fp32" | "bf16" | "int8"; "mixed" otherwise)."""
    found = {m.expert_weights().dtype for experts in expert_lists(model) for m in experts}
    return found.pop() if len(found) == 1 else "mixed"
