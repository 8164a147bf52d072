"""Qwen2.5-VL-style attention: RMSNorm, multimodal RoPE (M-RoPE), GQA attention (its KV caches:
model/kv_cache.py).

Shape legend: B batch, L new tokens, S cached + new tokens, D model dim, H query heads,
G key/value heads, Hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unimoe_ray.model import kernels
from unimoe_ray.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op, the same values as the three-step form below (checked in tests).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 like Qwen2 (bf16 variance loses precision).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MRoPE(nn.Module):
    """Rotary embedding whose frequency bands take positions from three axes (time, height,
    width): band sizes `mrope_section` (Qwen2.5-VL). With equal axes it is plain 1-D RoPE."""

    def __init__(self, *, head_dim: int, theta: float, mrope_section: tuple[int, ...]) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = tuple(mrope_section)

    def forward(self, position_ids_3BL: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos_B1LHd, sin_B1LHd) in `apply_rope`'s form: a head axis to broadcast over,
        and sin's first half negated (so rotating half of x is a roll). Made once per forward."""
        freqs_3BLh = position_ids_3BL.float()[..., None] * self.inv_freq
        emb_3BLHd = torch.cat([freqs_3BLh, freqs_3BLh], dim=-1)
        # Band i of the (doubled) frequency axis reads its positions from axis i % 3.
        sections = list(self.mrope_section) * 2
        chunks = emb_3BLHd.split(sections, dim=-1)
        emb_BLHd = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        half = emb_BLHd.shape[-1] // 2
        sin_BLHd = emb_BLHd.sin()
        sin_BLHd[..., :half].neg_()
        return emb_BLHd.cos().to(dtype)[:, None], sin_BLHd.to(dtype)[:, None]


def apply_rope(x_BHLd: torch.Tensor, cos_B1LHd: torch.Tensor, sin_B1LHd: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = [-x₂, x₁]: with `MRoPE`'s sin (first half
    negated) that is x·cos + roll(x, Hd/2)·sin — the same products, two small ops fewer."""
    return x_BHLd * cos_B1LHd + x_BHLd.roll(x_BHLd.shape[-1] // 2, -1) * sin_B1LHd


class Attention(nn.Module):
    """Grouped-query self-attention with biases on q/k/v (Qwen2 layout)."""

    def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self._qkv: tuple[tuple, tuple[torch.Tensor, torch.Tensor] | None] = ((), None)

    def fuse_qkv(self) -> None:
        """Inference set-up for fp32 weights: q, k and v weights (and biases) become views of
        one buffer each, so that `forward` without autograd computes all three in one GEMM and
        ropes q and k in one pass. Other dtypes (the released checkpoint's bf16) keep the three
        projections: one wider GEMM may round a bf16 result differently from transformers'
        Qwen2 attention. Optimisers built before hold the old tensors."""
        lins = (self.q_proj, self.k_proj, self.v_proj)
        if any(lin.weight.dtype != torch.float32 for lin in lins):
            return
        with torch.no_grad():
            w = torch.cat([lin.weight for lin in lins])
            b = torch.cat([lin.bias for lin in lins])
        start = 0
        for lin in lins:
            stop = start + lin.out_features
            lin.weight = nn.Parameter(w[start:stop], requires_grad=lin.weight.requires_grad)
            lin.bias = nn.Parameter(b[start:stop], requires_grad=lin.bias.requires_grad)
            start = stop

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, bias) spanning q, k, v when they lie in one buffer each (`fuse_qkv`), else
        None; re-derived whenever a parameter's storage changes."""
        mods = self._modules
        params = [mods[n]._parameters[p] for p in ("weight", "bias") for n in ("q_proj", "k_proj", "v_proj")]
        sig = tuple(t.data_ptr() for t in params) + (params[0].dtype,)
        if self._qkv[0] != sig:
            self._qkv = (sig, _spans(params[:3], params[3:]))
        return self._qkv[1]

    def __getstate__(self) -> dict:
        # The views are derived state: never pickle or deep-copy them (a copy re-derives its own).
        return {**self.__dict__, "_qkv": ((), None)}

    def forward(
        self,
        x_BLD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_B1LS: torch.Tensor | None,
        cache: KVCache | None,
        layer_idx: int,
    ) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        H, G, Hd = self.num_heads, self.num_kv_heads, self.head_dim
        fused = None if torch.is_grad_enabled() else self.fused_qkv()
        if fused is not None:
            # One GEMM for q, k, v; one rope pass over q's and k's heads together.
            qkv_BNLd = F.linear(x_BLD, *fused).view(B, L, H + 2 * G, Hd).transpose(1, 2)
            qk_BNLd = apply_rope(qkv_BNLd[:, : H + G], *cos_sin)
            q_BHLd, k_BGLd, v_BGLd = qk_BNLd[:, :H], qk_BNLd[:, H:], qkv_BNLd[:, H + G :]
        else:
            q_BHLd = apply_rope(self.q_proj(x_BLD).view(B, L, H, Hd).transpose(1, 2), *cos_sin)
            k_BGLd = apply_rope(self.k_proj(x_BLD).view(B, L, G, Hd).transpose(1, 2), *cos_sin)
            v_BGLd = self.v_proj(x_BLD).view(B, L, G, Hd).transpose(1, 2)
        if cache is not None:
            k_BGLd, v_BGLd = cache.update(layer_idx, k_BGLd, v_BGLd)
        out_BHLd = F.scaled_dot_product_attention(
            q_BHLd, k_BGLd, v_BGLd, attn_mask=mask_B1LS, is_causal=mask_B1LS is None and cache is None, enable_gqa=True
        )
        return self.o_proj(out_BHLd.transpose(1, 2).reshape(B, L, -1))


def _spans(weights: list[torch.Tensor], biases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weights stacked by rows and the biases concatenated, as views, when each tensor
    directly follows the previous one in memory (`kernels.follows_in_memory`); else None."""
    out = []
    for ts in (weights, biases):
        if not kernels.follows_in_memory(ts):
            return None
        out.append(ts[0].as_strided((sum(t.shape[0] for t in ts), *ts[0].shape[1:]), ts[0].stride()))
    return out[0], out[1]


def fuse_qkv(model: nn.Module) -> None:
    """`Attention.fuse_qkv` on every attention of `model` (inference set-up)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fuse_qkv()


def attention_mask(valid_BS: torch.Tensor, num_new: int) -> torch.Tensor:
    """Causal mask over S keys for the last `num_new` queries, hiding padded keys.

    A padded query would see no key at all (softmax of nothing → NaN); it may see itself.
    Returns bool mask_B1LS (True = may attend).
    """
    S = valid_BS.shape[1]
    q_pos_L = torch.arange(S - num_new, S, device=valid_BS.device)
    k_pos_S = torch.arange(S, device=valid_BS.device)
    causal_LS = k_pos_S[None, :] <= q_pos_L[:, None]
    allowed_BLS = causal_LS[None] & valid_BS[:, None, :]
    allowed_BLS |= (k_pos_S[None, :] == q_pos_L[:, None])[None]
    return allowed_BLS[:, None]
