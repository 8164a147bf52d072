"""DCMoE block: sparse dispatch, null and shared experts, Top-K reference, gradients."""

import dataclasses

import pytest
import torch

from unimoe_ray.config import ConfigError, MoEConfig
from unimoe_ray.model.moe import DCMoE, DenseFFN, build_ffn

DIM = 16


def make(**kw) -> DCMoE:
    cfg = MoEConfig(num_routed=4, num_null=1, num_shared=2, routed_intermediate=24, shared_intermediate=8, **kw)
    return DCMoE(dim=DIM, cfg=cfg).eval()


def reference_dense(moe: DCMoE, x):
    """Every expert on every token, weighted by the router's decision (test oracle only)."""
    r = moe.route(x)
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.routed_experts):
        out += r.weights_TR[:, e : e + 1] * expert(x)
    for j, expert in enumerate(moe.shared_experts):
        out += r.shared_weights_TS[:, j : j + 1] * expert(x)
    return out


@pytest.mark.parametrize("weighting", ["paper", "released"])
@pytest.mark.parametrize("mode", ["top_p", "top_k"])
def test_sparse_dispatch_equals_dense_reference(mode, weighting):
    moe = make(mode=mode, weighting=weighting, top_k=2)
    x = torch.randn(40, DIM)
    out, stats = moe(x)
    torch.testing.assert_close(out, reference_dense(moe, x), atol=1e-6, rtol=1e-5)
    assert sum(stats.counts) == int(stats.mask_TR[:, :4].sum())
    if mode == "top_k":
        assert stats.k_T.tolist() == [2] * 40


def test_each_expert_runs_once_on_exactly_its_tokens():
    moe = make()
    seen = {}
    for e, expert in enumerate(moe.routed_experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: seen.setdefault(e, []).append(inp[0].shape[0]))
    x = torch.randn(64, DIM)
    _, stats = moe(x)
    for e, n in enumerate(stats.counts):
        assert seen.get(e, []) == ([n] if n else [])


def test_null_only_tokens_get_only_shared_output():
    moe = make(weighting="released")
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[4, 0] = 50.0  # null expert's logit dominates when x[0] > 0
    x = torch.randn(8, DIM)
    x[:, 0] = 1.0
    calls = []
    for expert in moe.routed_experts:
        expert.register_forward_hook(lambda *a: calls.append(1))
    out, stats = moe(x)
    assert stats.k_T.tolist() == [1] * 8 and stats.mask_TR[:, 4].all()
    assert calls == []  # no routed compute at all
    r = moe.route(x)
    expected = sum(r.shared_weights_TS[:, j : j + 1] * e(x) for j, e in enumerate(moe.shared_experts))
    torch.testing.assert_close(out, expected)


def test_gradient_reaches_router_and_experts():
    moe = make(weighting="released")
    moe.train()
    x = torch.randn(32, DIM, requires_grad=True)
    out, stats = moe(x)
    (out.pow(2).sum() + stats.aux_loss).backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    for e, n in enumerate(stats.counts):
        g = moe.routed_experts[e].up_proj.weight.grad
        assert (g is not None and g.abs().sum() > 0) == (n > 0)
    assert all(s.gate_proj.weight.grad.abs().sum() > 0 for s in moe.shared_experts)
    assert x.grad.abs().sum() > 0


def test_sparsemixer_router_only_in_training_when_the_released_key_is_false():
    # eps = router_jitter = 0.2: wide near-tie pools; no input jitter, so the logits of two
    # training draws differ only by the router jitter.
    moe = make(ignore_differentiable_router=False, router_jitter=0.2, input_jitter=0.0)
    x = torch.randn(64, DIM)
    assert torch.equal(moe.route(x).mask_TR, moe.route(x).mask_TR)  # inference: deterministic
    moe.train()
    picks = [moe.route(x).mask_TR for _ in range(4)]
    assert any(not torch.equal(picks[0], p) for p in picks[1:])  # training: perturbed picks
    out, stats = moe(x)
    (out.pow(2).sum() + stats.aux_loss).backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_jitter_only_in_training():
    moe = make()
    x = torch.randn(16, DIM)
    torch.testing.assert_close(moe.router_logits(x), moe.router_logits(x))
    moe.train()
    assert not torch.equal(moe.router_logits(x), moe.router_logits(x))


def test_token_drop_caps_tokens_per_expert():
    moe = make(token_drop=True, capacity_factor=0.5, min_capacity=1)
    x = torch.randn(90, DIM)
    _, stats = moe(x)
    cap = 9  # ceil(90 tokens / 5 dynamic experts · 0.5)
    assert max(stats.counts) <= cap
    assert int(stats.mask_TR[:, 4].sum()) <= cap


def test_dense_mode_and_bad_config():
    cfg = MoEConfig(mode="dense", dense_intermediate=32)
    ffn = build_ffn(dim=DIM, cfg=cfg, layer_idx=0)
    assert isinstance(ffn, DenseFFN)
    out, stats = ffn(torch.randn(3, DIM))
    assert out.shape == (3, DIM) and stats is None
    for p in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="top_p"):
            dataclasses.replace(cfg, top_p=p)
