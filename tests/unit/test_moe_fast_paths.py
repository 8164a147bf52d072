"""The inference-only expert paths (every kernel candidate, at few and many tokens) give the
autograd path's numbers."""

import copy

import pytest
import torch

from unimoe_ray.config import MoEConfig
from unimoe_ray.model import autotune, kernel_plans, kernels
from unimoe_ray.model.experts import SwiGLU, run_grouped, stack_experts
from unimoe_ray.model.moe import DCMoE

DIM = 16
FP32 = [name for name, c in kernels.CANDIDATES.items() if "fp32" in c.dtypes]


@pytest.fixture(autouse=True)
def _no_plans():
    kernel_plans.clear()
    yield
    kernel_plans.clear()


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
        kernel_plans.register(mlp.expert_weights().key, kernel_plans.Plan((1,), (name,), "measured"))
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
    cfg = MoEConfig(
        num_routed=4, num_null=1, num_shared=2, routed_intermediate=24, shared_intermediate=8, weighting=weighting
    )
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
    cfg = MoEConfig(num_routed=4, num_null=1, num_shared=2, routed_intermediate=24, shared_intermediate=8)
    moe = DCMoE(dim=DIM, cfg=cfg).train()
    for p in list(moe.routed_experts.parameters()) + list(moe.shared_experts.parameters()):
        p.requires_grad_(False)
    out, stats = moe(torch.randn(32, DIM))
    (out.pow(2).sum() + stats.aux_loss).backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def _layer_with_stacked_experts(dtype=torch.float32):
    torch.manual_seed(7)
    cfg = MoEConfig(
        num_routed=4, num_null=1, num_shared=2, routed_intermediate=24, shared_intermediate=8, weighting="released"
    )
    moe = DCMoE(dim=DIM, cfg=cfg).eval()
    ref = copy.deepcopy(moe)
    stack_experts(moe.routed_experts, dtype)
    # As if this machine measured the layer-level kernel fastest at every count.
    kernel_plans.register(moe.routed_experts[0].expert_weights().key, kernel_plans.Plan((1,), ("grouped",), "measured"))
    return moe, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [(1, 2, 0, 1), (3, 0, 0, 0), (5, 7, 2, 9)])
def test_grouped_layer_run_equals_the_expert_loop(dtype, counts):
    """Stacked experts run in two grouped GEMMs: what the per-expert x·Wᵀ loop gives (the same
    GEMMs per expert; BLAS may sum in another order at these tiny dims)."""
    moe, _ = _layer_with_stacked_experts(dtype)
    backend = moe.expert_backend
    w0 = moe.routed_experts[0].gate_proj.weight
    assert backend.stacked() is not None and backend.stacked()[0].data_ptr() == w0.data_ptr()
    assert kernel_plans.grouped_applies(moe.routed_experts[0].expert_weights(), counts)
    x = torch.randn(sum(counts), DIM)
    with torch.inference_mode():
        loop = run_grouped(moe.routed_experts, x, counts)
        calls = []
        real = kernels.grouped_swiglu
        kernels.grouped_swiglu = lambda *a: calls.append(1) or real(*a)
        try:
            got = backend.run(0, x, counts)
        finally:
            kernels.grouped_swiglu = real
    assert calls, "the grouped path was not taken"
    assert got.dtype == x.dtype
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, loop, **tol)


def test_grouped_path_follows_the_measured_choice_and_stale_stacks():
    moe, ref = _layer_with_stacked_experts()
    backend, w = moe.expert_backend, moe.routed_experts[0].expert_weights()
    # Where W·xᵀ was measured faster for some active count, the loop runs (the choice holds).
    kernel_plans.register(w.key, kernel_plans.Plan((2, 4), ("grouped", "wxt_pad2"), "measured"))
    assert kernel_plans.grouped_applies(w, (1, 2, 0, 0))
    assert not kernel_plans.grouped_applies(w, (1, 3, 0, 0))
    kernel_plans.clear()  # no measured plan: never grouped (UNIMOE_KERNELS=default runs the loop)
    assert not kernel_plans.grouped_applies(w, (1, 2, 0, 0))
    # An expert whose weights moved out of the stack (re-fused, reloaded): no grouped views.
    gate = moe.routed_experts[2].gate_proj
    gate.weight = torch.nn.Parameter(gate.weight.detach().clone())
    assert backend.stacked() is None
    x = torch.randn(6, DIM)
    with torch.inference_mode():
        torch.testing.assert_close(moe(x)[0], ref(x)[0], atol=1e-6, rtol=1e-5)


def test_stacked_layer_matches_the_unstacked_one_and_keeps_hooks():
    moe, ref = _layer_with_stacked_experts()
    x = torch.randn(9, DIM)
    with torch.inference_mode():
        torch.testing.assert_close(moe(x)[0], ref(x)[0], atol=1e-6, rtol=1e-5)
    seen = []
    moe.routed_experts[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.inference_mode():
        _, stats = moe(x)
    assert seen == ([stats.counts[1]] if stats.counts[1] else [])  # hooks still fire per expert
    # Training still works on stacked experts (autograd path, gradients reach the views).
    moe.train()
    moe(x)[0].sum().backward()
    assert moe.routed_experts[0].gate_proj.weight.grad is not None


@pytest.mark.parametrize("num_tokens", [1, 2, 7])
def test_shared_experts_in_one_grouped_call_match_their_loop(num_tokens):
    moe, ref = _layer_with_stacked_experts()
    stack_experts(moe.shared_experts)
    kernel_plans.register(moe.shared_experts[0].expert_weights().key, kernel_plans.Plan((1,), ("grouped",), "measured"))
    x = torch.randn(num_tokens, DIM)
    calls = []
    real = kernels.grouped_swiglu
    kernels.grouped_swiglu = lambda *a: calls.append(a[-1]) or real(*a)
    try:
        with torch.inference_mode():
            got, _ = moe(x)
            want, _ = ref(x)
    finally:
        kernels.grouped_swiglu = real
    assert (num_tokens, num_tokens) in calls  # the two shared experts, one call
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_measure_times_the_grouped_candidate_only_over_stacked_experts():
    moe, _ = _layer_with_stacked_experts()
    kernel_plans.clear()
    stacked = [m.expert_weights() for m in moe.routed_experts]
    plan = autotune.measure(stacked, ladder=(1, 3), rounds=1)
    assert all("grouped" in plan.ms[n] for n in (1, 3))
    loose = copy.deepcopy(moe.routed_experts)  # a deep copy: each expert's own storage again
    for m in loose:
        m.fuse_gate_up()
    plan = autotune.measure([m.expert_weights() for m in loose], ladder=(1,), rounds=1)
    assert "grouped" not in plan.ms[1]


@pytest.mark.parametrize("candidate", ["int8_mm_bf16", "int8_mm"])
@pytest.mark.parametrize("num_tokens", [1, 2, 9])
def test_int8_layer_call_is_the_per_expert_loop_bit_for_bit(candidate, num_tokens):
    """int8 experts at once (casts once per layer) compute exactly what each expert's own
    kernel call computes; hooks still send the layer through the per-expert loop."""
    from unimoe_ray.model.quantize import convert_experts

    torch.manual_seed(num_tokens)
    # Inner dims multiples of 16: torch's bf16-activation int8 kernel needs them.
    cfg = MoEConfig(
        num_routed=4, num_null=1, num_shared=2, routed_intermediate=32, shared_intermediate=16, weighting="released"
    )
    moe = convert_experts(DCMoE(dim=DIM, cfg=cfg).eval(), "int8", select=False, hugepages=False)
    for experts in (moe.routed_experts, moe.shared_experts):
        kernel_plans.register(experts[0].expert_weights().key, kernel_plans.Plan((1,), (candidate,), "measured"))
    x = torch.randn(num_tokens, DIM)
    calls = []
    real = kernels.int8_layer
    kernels.int8_layer = lambda *a: calls.append(a[2]) or real(*a)
    try:
        with torch.inference_mode():
            got, stats = moe(x)
    finally:
        kernels.int8_layer = real
    assert [num_tokens, num_tokens] in calls  # the shared pair
    assert [n for n in stats.counts if n] in calls  # the routed experts
    for m in [*moe.routed_experts, *moe.shared_experts]:
        m.register_forward_hook(lambda *_: None)
    with torch.inference_mode():
        loop, _ = moe(x)
    assert torch.equal(got, loop)
