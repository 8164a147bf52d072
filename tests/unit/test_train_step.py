"""The torch-only training step: loss definition, accumulation = union batch, NaN skipping,
bf16 autocast with fp32 router logits, the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch

from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import PromptBuilder, config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.batches import ExampleBuilder, collate
from unimoe_ray.train.config import TrainConfigError, stage_config
from unimoe_ray.train.optim import TorchBackend, cosine_with_warmup
from unimoe_ray.train.step import LossModule, evaluate, train_step
from unimoe_ray.train.synthetic import synthetic_rows


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok = load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))
    # No jitter: the same batch gives the same routing (needed to compare two computations).
    cfg = config_for_tokenizer(get_preset("tiny"), tok).replace(moe=dict(input_jitter=0.0, router_jitter=0.0))
    build = ExampleBuilder(PromptBuilder(tok, cfg), cfg)
    rows = synthetic_rows("tts_en", 3, frames=(8, 30)) + synthetic_rows("t2m", 3, frames=(8, 30))
    return cfg, [build(r) for r in rows]


def _model(cfg):
    return UniMoEAudio(cfg).init_weights(seed=1).train()


def test_loss_is_the_models_sum_of_per_codebook_ce(env):
    cfg, ex = env
    model = _model(cfg)
    batch = collate(ex[:4], cfg)
    ce_sum_K, count_K, aux, _ = LossModule(model)(batch)
    out = model(**batch.model_kwargs(), return_logits=False)
    torch.testing.assert_close((ce_sum_K / count_K).sum(), out.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(count_K, (batch.labels_BKL != -100).sum(dim=(0, 2)))


def test_accumulated_micro_batches_equal_one_union_batch(env):
    cfg, ex = env
    tc = stage_config("stage3", lr=1e-2, warmup_steps=0, max_steps=10, grad_clip=0.0)
    a, b = _model(cfg), _model(cfg)
    accum = TorchBackend(LossModule(a), tc.replace(grad_accum=2))
    union = TorchBackend(LossModule(b), tc)
    for step in range(4):
        part1, part2 = ex[: 2 + step % 2], ex[2 + step % 2 :]
        r1 = train_step(accum, [collate(part1, cfg), collate(part2, cfg)], aux_weight=0.0)
        r2 = train_step(union, [collate(part1 + part2, cfg)], aux_weight=0.0)
        assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
        assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-4)
    # (Weights are not compared element-wise: AdamW's first steps are ±lr for any gradient,
    # so parameters whose gradient is ~0 move by float noise in opposite directions.)


def test_non_finite_loss_skips_the_update_and_names_the_cause(env):
    cfg, ex = env
    model = _model(cfg)
    backend = TorchBackend(LossModule(model), stage_config("stage3", warmup_steps=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.codec_head.weight[0, 0] = float("nan")
    before["codec_head.weight"] = model.codec_head.weight.detach().clone()
    res = train_step(backend, [collate(ex[:2], cfg)], aux_weight=0.01)
    assert res.skipped and "codec cross-entropy non-finite" in res.cause
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or (p.isnan() == before[n].isnan()).all(), n
    assert backend.scheduler.last_epoch == 0  # the schedule did not advance
    assert all(p.grad is None for p in model.parameters())


def test_bf16_autocast_keeps_router_logits_fp32(env):
    cfg, ex = env
    model = _model(cfg)
    seen = []
    orig = torch.nn.functional.linear

    def spy(x, w, *args, **kwargs):
        y = orig(x, w, *args, **kwargs)
        if w.shape[0] == cfg.moe.num_experts and w.shape[1] == cfg.hidden_size:
            seen.append(y.dtype)
        return y

    backend = TorchBackend(LossModule(model), stage_config("stage3", warmup_steps=0))
    torch.nn.functional.linear = spy
    try:
        res = train_step(backend, [collate(ex[:2], cfg)], aux_weight=0.01, autocast_dtype=torch.bfloat16)
    finally:
        torch.nn.functional.linear = orig
    assert not res.skipped and math.isfinite(res.loss)
    assert seen and all(d == torch.float32 for d in seen)


def test_evaluate_reports_each_task(env):
    cfg, ex = env
    val = evaluate(_model(cfg), [collate(ex[:3], cfg), collate(ex[3:], cfg)])
    assert set(val) == {"tts_en", "t2m"}
    assert all(60 < v < 100 for v in val.values())  # ≈ 12 · ln(1027) at init


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    f = lambda s: cosine_with_warmup(s, warmup=4, total=14, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55)  # halfway through the cosine
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_bad_train_options_are_named():
    with pytest.raises(TrainConfigError, match="grad_accum"):
        stage_config("stage1", grad_accum=0)
    with pytest.raises(TrainConfigError, match="unknown stage"):
        stage_config("stage4")
    with pytest.raises(TrainConfigError, match="unknown tasks"):
        stage_config("stage1", tasks=("tts_fr",))
    assert stage_config("stage2").lr == 3e-5 and stage_config("stage1").lr == 1e-4
    assert stage_config("stage3").lr == 1e-5
