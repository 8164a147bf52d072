"""The inference-only expert paths (every kernel candidate, at few and many tokens) give the
autograd path's numbers."""

import pytest
import torch

from unimoe_ray.config import MoEConfig
from unimoe_ray.model import kernels
from unimoe_ray.model.experts import SwiGLU
from unimoe_ray.model.moe import DCMoE

DIM = 16
FP32 = [name for name, c in kernels.CANDIDATES.items() if "fp32" in c.dtypes]


@pytest.fixture(autouse=True)
def _no_plans():
    kernels.clear()
    yield
    kernels.clear()


@pytest.mark.parametrize("name", ["default", *FP32])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 13, 16, 61, 64, 65, 2 * kernels.BLOCK_TOKENS + 7])
def test_swiglu_fast_paths_match_autograd_path(n, name):
    torch.manual_seed(n)
    mlp = SwiGLU(dim=DIM, hidden=24)
    mlp.fuse_gate_up()  # the fused candidates need gate and up in one buffer
    x = torch.randn(n, DIM)
    expected = mlp(x)  # parameters require grad: the plain autograd formula
    assert expected.requires_grad
    if name != "default":  # route every token count to this candidate
        kernels.register(mlp.expert_weights().key, kernels.Plan((1,), (name,), "measured"))
    with torch.inference_mode():
        got = mlp(x)
        out = torch.full((n + 3, DIM), float("nan"))
        written = mlp(x, out_nD=out[1 : n + 1])
    assert got.is_contiguous() and not got.requires_grad
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(written, expected.detach(), atol=1e-6, rtol=1e-5)
    assert out[0].isnan().all() and out[n + 1 :].isnan().all()  # wrote its rows only


@pytest.mark.parametrize("weighting", ["paper", "released"])
@pytest.mark.parametrize("num_tokens", [1, 3, 40, 300])
def test_dcmoe_inference_matches_grad_mode(weighting, num_tokens):
    torch.manual_seed(num_tokens)
    cfg = MoEConfig(num_routed=4, num_null=1, num_shared=2, routed_intermediate=24,
                    shared_intermediate=8, weighting=weighting)
    moe = DCMoE(dim=DIM, cfg=cfg).eval()
    x = torch.randn(num_tokens, DIM)
    expected, stats = moe(x)
    with torch.inference_mode():
        got, got_stats = moe(x)
    assert got_stats.counts == stats.counts
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-5)


def test_frozen_experts_still_pass_gradient_to_router():
    """Stage-2 warm-up: experts frozen (fast path), router trains through the combine weights."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_routed=4, num_null=1, num_shared=2, routed_intermediate=24,
                    shared_intermediate=8)
    moe = DCMoE(dim=DIM, cfg=cfg).train()
    for p in list(moe.routed_experts.parameters()) + list(moe.shared_experts.parameters()):
        p.requires_grad_(False)
    out, stats = moe(torch.randn(32, DIM))
    (out.pow(2).sum() + stats.aux_loss).backward()
    assert moe.gate.weight.grad.abs().sum() > 0
