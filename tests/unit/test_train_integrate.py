"""Stage-2 integration: dense specialists → DCMoE, the exact FFN split, the freezing rule."""

from __future__ import annotations

import pytest
import torch

from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.integrate import (
    IntegrationError,
    apply_trainable,
    check_compatible,
    integrate_specialists,
    specialist_config,
)
from unimoe_ray.train.optim import TorchBackend
from unimoe_ray.train.step import LossModule

TASKS = ["tts_zh", "tts_en", "t2m", "v2m"]


@pytest.fixture(scope="module")
def merged():
    # 4 specialists × 2 proto-experts = 8 routed experts of width 16 (specialist FFN width 32).
    target = get_preset("tiny").replace(
        moe=dict(num_routed=8, routed_intermediate=16, input_jitter=0.0, router_jitter=0.0)
    )
    spec_cfg = specialist_config(target, 4)
    assert spec_cfg.moe.mode == "dense" and spec_cfg.moe.dense_intermediate == 32
    specialists = {t: UniMoEAudio(spec_cfg).init_weights(seed=i) for i, t in enumerate(TASKS)}
    cfg, state = integrate_specialists({t: m.state_dict() for t, m in specialists.items()}, spec_cfg)
    model = UniMoEAudio(cfg)
    model.load_state_dict(state)  # strict: every tensor of the DCMoE model is produced
    return specialists, cfg, model


@pytest.mark.parametrize("weighting, second_logit", [("paper", 0.0), ("released", -0.5)])
@pytest.mark.parametrize("s", range(4))
def test_routing_to_one_specialists_proto_experts_reproduces_its_ffn(merged, s, weighting, second_logit):
    """Both combine rules give 1/2 to each of two chosen experts: the paper's renormalised
    probabilities when the two logits tie, the released SparseMixer multipliers when they are
    not near-tied. Then the block's output is specialist s's FFN output, exactly."""
    specialists, cfg, model = merged
    layer = 1
    moe = model.language_model.layers[layer].mlp
    moe.cfg = cfg.moe.__class__(**{**cfg.moe.__dict__, "weighting": weighting})
    moe.eval()
    u_D = torch.randn(cfg.hidden_size)
    logits_E = torch.full((cfg.moe.num_experts,), -60.0)
    logits_E[[2 * s, 2 * s + 1]] = torch.tensor([0.0, second_logit])
    with torch.no_grad():
        # Router W = logits ⊗ u / |u|²: every token along u gets exactly these logits.
        moe.gate.weight.copy_(logits_E[:, None] * u_D[None, :] / u_D.pow(2).sum())
        x_TD = u_D.expand(7, -1).contiguous()
        out_TD, stats = moe(x_TD)
        ref_TD, _ = specialists[TASKS[s]].language_model.layers[layer].mlp(x_TD)
    assert stats.mask_TR[:, [2 * s, 2 * s + 1]].all() and int(stats.mask_TR.sum()) == 2 * 7
    torch.testing.assert_close(out_TD, ref_TD, rtol=1e-5, atol=1e-6)


def test_attention_is_averaged_and_vision_comes_from_v2m(merged):
    specialists, _, model = merged
    name = "language_model.layers.0.self_attn.q_proj.weight"
    avg = torch.stack([m.state_dict()[name] for m in specialists.values()]).mean(0)
    torch.testing.assert_close(model.state_dict()[name], avg)
    v = next(n for n in model.state_dict() if n.startswith("visual."))
    assert torch.equal(model.state_dict()[v], specialists["v2m"].state_dict()[v])
    down = model.state_dict()["language_model.layers.0.mlp.shared_experts.0.down_proj.weight"]
    assert (down == 0).all()  # shared experts start silent (documented rule)


def test_stage2_freezes_all_but_router_and_shared_experts(merged):
    _, cfg, model = merged
    model = UniMoEAudio(cfg).train()
    model.load_state_dict(merged[2].state_dict())
    trainable = apply_trainable(model, "router_and_shared")
    assert trainable and all(".mlp.gate." in n or ".shared_experts." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backend = TorchBackend(LossModule(model), stage_config("stage2", lr=1e-2, warmup_steps=0))
    from unimoe_ray.train.batches import Batch

    K, L = cfg.codec_channels, 40
    ids = torch.full((2, L), cfg.codec_placeholder_id)
    codes = torch.randint(0, 1024, (2, K, L))
    batch = Batch(
        input_ids_BL=ids,
        audio_codes_BKL=codes,
        labels_BKL=codes.clone(),
        attention_mask_BL=torch.ones(2, L, dtype=torch.bool),
        sample_ids=["a", "b"],
        tasks=["t2m"] * 2,
    )
    from unimoe_ray.train.step import train_step

    for _ in range(3):
        train_step(backend, [batch], aux_weight=0.01)
    for n, p in model.named_parameters():
        if n in trainable and n.endswith("gate.weight"):
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        elif n not in trainable:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".shared_experts." in n)


def test_mismatched_specialists_are_refused():
    tiny = get_preset("tiny")
    a = specialist_config(tiny, 4)
    b = specialist_config(tiny.replace(hidden_size=64, mrope_section=(4, 2, 2)), 4)
    with pytest.raises(IntegrationError, match="hidden_size"):
        check_compatible({"x": a, "y": b})
    with pytest.raises(IntegrationError, match="split evenly"):
        specialist_config(tiny, 3)
    wrong_width = a.replace(moe=dict(dense_intermediate=96))
    sd = UniMoEAudio(wrong_width).state_dict()
    with pytest.raises(IntegrationError, match="another expert count"):
        integrate_specialists({t: sd for t in TASKS}, wrong_width)
    no_v2m = {t: UniMoEAudio(a).state_dict() for t in TASKS[:3] + ["t2m_extra"]}
    with pytest.raises(IntegrationError, match="split evenly|V2M"):
        integrate_specialists(no_v2m, a)
