"""Inference-only shortcuts give the same values as the general forms: the fused fp32 RMSNorm,
the router's aux loss skipped under torch.inference_mode (and only there), and the fused q/k/v
projection."""

from __future__ import annotations

import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from unimoe_ray.model.attention import Attention, MRoPE, RMSNorm, apply_rope
from unimoe_ray.model.moe import DCMoE
from unimoe_ray.presets import get_preset


def test_rmsnorm_fp32_fused_equals_qwen2_and_the_bf16_form_is_kept():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=gen) * 3
    ours, ref = RMSNorm(64, 1e-6), Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64, generator=gen))
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    # bf16 keeps Qwen2's order (normalise in fp32, cast, then scale): bit-equal to transformers.
    ours_b, ref_b = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    xb = x.bfloat16()
    assert torch.equal(ours_b(xb), ref_b(xb))


def test_aux_loss_is_skipped_only_under_inference_mode():
    cfg = get_preset("tiny")
    layer = DCMoE(dim=cfg.hidden_size, cfg=cfg.moe).eval()
    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_ng, st_ng = layer(x)
    with torch.inference_mode():
        out_im, st_im = layer(x)
    assert float(st_ng.aux_loss) > 0  # evaluation (validation, routing analysis) still gets it
    assert float(st_im.aux_loss) == 0.0
    assert torch.equal(out_ng, out_im) and torch.equal(st_ng.mask_TR, st_im.mask_TR)


def test_fused_qkv_matches_the_three_projections_and_keeps_training_exact():
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=4, num_kv_heads=2)
    rope = MRoPE(head_dim=16, theta=10000.0, mrope_section=(2, 3, 3))
    x = torch.randn(2, 5, 64)
    cos_sin = rope(torch.arange(5).expand(3, 2, 5), x.dtype)
    with torch.inference_mode():
        want = attn(x, cos_sin, None, None, 0)
    assert attn.fused_qkv() is None
    attn.fuse_qkv()
    w, b = attn.fused_qkv()
    assert w.shape == (4 * 16 + 2 * 2 * 16, 64) and w.data_ptr() == attn.q_proj.weight.data_ptr()
    with torch.inference_mode():
        got = attn(x, cos_sin, None, None, 0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # With autograd the three projections run as before: each gets its own gradient.
    attn(x, cos_sin, None, None, 0).sum().backward()
    assert all(p.grad is not None for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.bias))
    # A parameter moved out of the shared buffer (reloaded, re-cast): no fused span any more.
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())
    assert attn.fused_qkv() is None
    with torch.inference_mode():
        torch.testing.assert_close(attn(x, cos_sin, None, None, 0), want, atol=1e-6, rtol=1e-5)


def test_bf16_attention_keeps_its_three_projections():
    attn = Attention(dim=64, num_heads=4, num_kv_heads=2).to(torch.bfloat16)
    attn.fuse_qkv()
    assert attn.fused_qkv() is None  # bf16 (the released checkpoint) rounds as transformers does


def test_mrope_equals_transformers_qwen2_5_vl_bit_for_bit():
    """Our rope (sin pre-signed, rotate-half as a roll) gives transformers' Qwen2.5-VL values."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

    section = (2, 3, 3)
    cfg = Qwen2_5_VLTextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(section)},
    )
    ref_rope = Qwen2_5_VLRotaryEmbedding(cfg)
    ours = MRoPE(head_dim=16, theta=10000.0, mrope_section=section)
    gen = torch.Generator().manual_seed(0)
    pos_3BL = torch.randint(0, 500, (3, 2, 7), generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 4, 7, 16, generator=gen).to(dtype)
        k = torch.randn(2, 2, 7, 16, generator=gen).to(dtype)
        cos, sin = ref_rope(q, pos_3BL)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        cos_sin = ours(pos_3BL, dtype)
        assert torch.equal(apply_rope(q, *cos_sin), want_q)
        assert torch.equal(apply_rope(k, *cos_sin), want_k)
