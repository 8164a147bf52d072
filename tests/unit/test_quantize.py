"""int8 / bf16 expert weights: the quantiser's values by hand, conversion of a whole model
(values against the fp32 model and against the dequantised weights), bytes saved, and clear
errors for what a converted model cannot do."""

import pickle

import pytest
import torch

from unimoe_ray.config import MoEConfig
from unimoe_ray.model import autotune, kernel_cache, kernel_plans
from unimoe_ray.model.experts import SwiGLU
from unimoe_ray.model.moe import DCMoE
from unimoe_ray.model.quantize import Int8SwiGLU, convert_experts, expert_dtype, quantize_int8
from unimoe_ray.model.unimoe_audio import UniMoEAudio


@pytest.fixture(autouse=True)
def _default_kernels(monkeypatch):
    monkeypatch.setenv(autotune.ENV_MODE, "default")  # selection is tested in test_kernels.py
    kernel_plans.clear()


def test_quantize_int8_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [2.54, 1.0, -2.54, 0.01]])
    q, s = quantize_int8(w)
    torch.testing.assert_close(s, torch.tensor([0.01, 1.0, 0.02]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[50, -127, 0, 30], [0, 0, 0, 0], [127, 50, -127, 0]]
    w = torch.randn(64, 96)
    q, s = quantize_int8(w)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


def tiny_model() -> UniMoEAudio:
    from unimoe_ray.presets import get_preset

    return UniMoEAudio(get_preset("tiny")).init_weights(seed=0).eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).codec_logits_BLKV.float()


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 3e-2), ("int8", 3e-2)])
def test_converted_model_stays_close_to_fp32(dtype, tol):
    ref_model = tiny_model()
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    want = logits(ref_model, ids)
    model = convert_experts(tiny_model(), dtype)
    assert expert_dtype(model) == dtype
    got = logits(model, ids)
    err = (got - want).abs().max() / want.abs().max()
    assert err < tol, float(err)
    if dtype != "fp32":
        assert err > 0  # the weights did change


def test_int8_layer_equals_fp32_layer_on_dequantised_weights():
    torch.manual_seed(0)
    cfg = MoEConfig(num_routed=4, num_null=1, num_shared=2, routed_intermediate=48, shared_intermediate=16)
    moe = DCMoE(dim=32, cfg=cfg).eval()
    q = convert_experts(pickle.loads(pickle.dumps(moe)), "int8")
    for lst_f, lst_q in ((moe.routed_experts, q.routed_experts), (moe.shared_experts, q.shared_experts)):
        for mf, mq in zip(lst_f, lst_q):
            assert isinstance(mq, Int8SwiGLU)
            g, u, d = mq.dequantized()
            with torch.no_grad():
                mf.gate_proj.weight.copy_(g)
                mf.up_proj.weight.copy_(u)
                mf.down_proj.weight.copy_(d)
    x = torch.randn(37, 32)
    with torch.inference_mode():
        want, _ = moe(x)
        got, _ = q(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expert_bytes_shrink():
    def expert_bytes(m):
        return sum(e.expert_weights().nbytes for lst in (m.routed_experts, m.shared_experts) for e in lst)

    torch.manual_seed(0)
    cfg = MoEConfig(num_routed=4, num_null=1, num_shared=2, routed_intermediate=64, shared_intermediate=32)
    sizes = {}
    for dtype in ("fp32", "bf16", "int8"):
        sizes[dtype] = expert_bytes(convert_experts(DCMoE(dim=64, cfg=cfg).eval(), dtype))
    assert sizes["bf16"] == sizes["fp32"] // 2
    # int8: a quarter, plus one fp32 scale per output channel (2F + D per expert).
    scales = 4 * (4 * (2 * 64 + 64) + 2 * (2 * 32 + 64))
    assert sizes["int8"] == sizes["fp32"] // 4 + scales


def test_bf16_experts_keep_fp32_activations_and_fused_storage():
    model = convert_experts(tiny_model(), "bf16")
    e = model.language_model.layers[0].mlp.routed_experts[0]
    assert e.gate_proj.weight.dtype == e.down_proj.weight.dtype == torch.bfloat16
    assert e.expert_weights().gate_up_2FD is not None
    assert model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    out = model.language_model.layers[0].mlp(torch.randn(5, 32))[0]
    assert out.dtype == torch.float32


@pytest.mark.parametrize("expert_dtype", [None, "int8"])
def test_bf16_model_runs_its_experts_in_bf16_activations(expert_dtype):
    """The released model loads in bf16: experts (bf16 or int8) take and return bf16."""
    ids = torch.randint(0, 400, (1, 7), generator=torch.Generator().manual_seed(2))
    want = logits(tiny_model(), ids)
    model = convert_experts(tiny_model().to(torch.bfloat16), expert_dtype)
    got = logits(model, ids)
    assert (got - want).abs().max() / want.abs().max() < 5e-2


def test_int8_experts_refuse_gradients_and_reconversion():
    model = convert_experts(tiny_model(), "int8")
    moe = model.language_model.layers[0].mlp
    with pytest.raises(RuntimeError, match="inference-only"):
        moe(torch.randn(4, 32, requires_grad=True))
    with pytest.raises(ValueError, match="load the checkpoint again"):
        convert_experts(model, "bf16")
    with pytest.raises(ValueError, match="expert_dtype='fp16'"):
        convert_experts(tiny_model(), "fp16")
    assert convert_experts(model, "int8") is model  # already int8: nothing to do


def test_int8_expert_pickles_without_its_kernel_cache():
    q = Int8SwiGLU.from_float(SwiGLU(dim=32, hidden=48))
    x = torch.randn(3, 32)
    with torch.inference_mode():
        want = q(x)
        q2 = pickle.loads(pickle.dumps(q))
        assert q2._packed is None
        torch.testing.assert_close(q2(x), want, rtol=0, atol=0)


def test_a_loaded_checkpoint_prepared_for_inference(tmp_path, monkeypatch):
    """What `AudioGenerator.load(..., expert_dtype=...)` does: the same loading code as real
    weights, then experts converted and kernels picked (measured on this machine, cached in a
    temp file)."""
    from unimoe_ray import checkpoint as ckpt

    monkeypatch.setenv(autotune.ENV_MODE, "auto")
    monkeypatch.setenv(kernel_cache.ENV_CACHE, str(tmp_path / "kernels.json"))
    monkeypatch.setattr(autotune, "LADDER", (1, 8))
    ref = tiny_model()
    ckpt.save_pretrained(ref, tmp_path / "m")
    ids = torch.randint(0, 400, (1, 6), generator=torch.Generator().manual_seed(3))
    want = logits(ref, ids)
    plain = ckpt.load_pretrained(tmp_path / "m", dtype=torch.float32)
    assert expert_dtype(plain) == "fp32" and kernel_plans.plans() == {}  # None: as loaded, defaults
    model = convert_experts(ckpt.load_pretrained(tmp_path / "m", dtype=torch.float32), "int8")
    assert expert_dtype(model) == "int8"
    assert {k.dtype for k in kernel_plans.plans()} == {"int8"}
    got = logits(model, ids)
    assert (got - want).abs().max() / want.abs().max() < 3e-2
    with pytest.raises(ValueError, match="expert_dtype='int4'"):
        convert_experts(ckpt.load_pretrained(tmp_path / "m"), "int4")
