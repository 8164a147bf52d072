"""Expert kernels: every candidate computes SwiGLU (checked in float64 by hand, for fp32, bf16
and int8 weights), plans route token counts as measured, and `select` measures once per
machine, caches, reads the cache back, and stays off under UNIMOE_KERNELS=default."""

import json

import pytest
import torch
import torch.nn.functional as F

from unimoe_ray.config import MoEConfig
from unimoe_ray.model import autotune, kernel_cache, kernel_plans, kernels
from unimoe_ray.model.experts import SwiGLU
from unimoe_ray.model.moe import DCMoE
from unimoe_ray.model.quantize import Int8SwiGLU, convert_experts

DIM, HIDDEN = 32, 48  # multiples of 16: every candidate applies
COUNTS = [1, 2, 3, 8, 9, 13, 64, 65, 2 * kernels.BLOCK_TOKENS + 7]


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_cache.ENV_CACHE, str(tmp_path / "kernels.json"))
    monkeypatch.delenv(autotune.ENV_MODE, raising=False)
    kernel_plans.clear()
    yield
    kernel_plans.clear()


def reference(x, gate, up, down):
    """SwiGLU in float64 from the weights as the kernel's storage represents them."""
    x, gate, up, down = (t.double() for t in (x, gate, up, down))
    return F.silu(x @ gate.t()) * (x @ up.t()) @ down.t()


def expert(dtype: str, seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    mlp = SwiGLU(dim=DIM, hidden=HIDDEN)
    if dtype == "int8":
        q = Int8SwiGLU.from_float(mlp)
        return q, q.dequantized()
    mlp.fuse_gate_up({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    mlp.down_proj.to(mlp.gate_proj.weight.dtype)
    return mlp, (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)


CASES = [(d, name) for name, c in kernels.CANDIDATES.items() for d in c.dtypes]


@pytest.mark.parametrize("dtype,name", CASES)
def test_every_candidate_computes_swiglu(dtype, name):
    module, weights = expert(dtype)
    w = module.expert_weights()
    assert w.dtype == dtype and kernels.CANDIDATES[name].applies(w)
    # fp32: summation order only; bf16 weights with bf16 activations or int8 with bf16
    # activations: activations round at 2^-8.
    low_precision = dtype in ("bf16", "fp16") and name != "upcast" or name == "int8_mm_bf16"
    tol = 2e-2 if low_precision else 1e-5
    with torch.inference_mode():
        for n in COUNTS:
            x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(n))
            want = reference(x, *weights)
            got = kernels.CANDIDATES[name].fn(x, w)
            assert got.dtype == torch.float32 and got.shape == (n, DIM)
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < tol, (n, float(err))
            out = torch.full((n + 2, DIM), float("nan"))
            kernels.CANDIDATES[name].fn(x, w, out[1 : n + 1])
            torch.testing.assert_close(out[1 : n + 1], got, rtol=0, atol=0)
            assert out[0].isnan().all() and out[-1].isnan().all()


def test_int8_bf16_kernel_is_kept_off_shapes_it_gets_wrong():
    torch.manual_seed(0)
    q = Int8SwiGLU.from_float(SwiGLU(dim=24, hidden=40))
    assert not kernels.CANDIDATES["int8_mm_bf16"].applies(q.expert_weights())
    assert kernels.CANDIDATES["int8_mm"].applies(q.expert_weights())


def test_unfused_weights_leave_fused_candidates_out():
    mlp = SwiGLU(dim=DIM, hidden=HIDDEN)  # gate and up in separate buffers
    w = mlp.expert_weights()
    assert w.gate_up_2FD is None and not kernels.CANDIDATES["xwt_fused"].applies(w)
    mlp.fuse_gate_up()
    w = mlp.expert_weights()
    assert w.gate_up_2FD is not None and w.gate_up_2FD.data_ptr() == mlp.gate_proj.weight.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == w.gate_up_2FD[HIDDEN:].data_ptr()


@pytest.mark.parametrize("name", ["xwt_fused", "wxt_fused"])
def test_fused_plan_still_runs_a_copied_module_whose_gate_and_up_split(name):
    import copy

    mlp, weights = expert("fp32")
    kernel_plans.register(mlp.expert_weights().key, kernel_plans.Plan((1,), (name,), "measured"))
    clone = copy.deepcopy(mlp)  # storage sharing between gate and up is not kept
    assert clone.expert_weights().gate_up_2FD is None
    x = torch.randn(5, DIM)
    with torch.inference_mode():
        got = clone(x)
    want = reference(x, *weights)
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()


def test_plan_routes_token_counts_to_the_measured_choice():
    plan = kernel_plans.Plan((1, 4, 16), ("wxt_pad2", "xwt_fused", "xwt"), "measured")
    assert [plan.name_for(n) for n in (1, 2, 4, 5, 16, 17, 5000)] == [
        "wxt_pad2",
        "xwt_fused",
        "xwt_fused",
        "xwt",
        "xwt",
        "xwt",
        "xwt",
    ]


def test_swiglu_runs_the_registered_candidate(monkeypatch):
    mlp, _ = expert("fp32")
    calls = []
    real = kernels.CANDIDATES["wxt_pad8"]

    def spy(x, w, out=None):
        calls.append(x.shape[0])
        return real.fn(x, w, out)

    monkeypatch.setitem(kernels.CANDIDATES, "wxt_pad8", kernels.Candidate("wxt_pad8", spy, real.dtypes))
    kernel_plans.register(mlp.expert_weights().key, kernel_plans.Plan((4, 64), ("xwt", "wxt_pad8"), "measured"))
    with torch.inference_mode():
        mlp(torch.randn(3, DIM))
        mlp(torch.randn(5, DIM))
        mlp(torch.randn(500, DIM))
    assert calls == [5, 500]


def small_moe() -> DCMoE:
    torch.manual_seed(0)
    cfg = MoEConfig(num_routed=4, num_null=1, num_shared=2, routed_intermediate=HIDDEN, shared_intermediate=16)
    return DCMoE(dim=DIM, cfg=cfg).eval()


def test_select_measures_caches_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "NOISY", float("inf"))  # a busy test machine must not skip the cache
    moe = small_moe()
    convert_experts(moe, None, select=False)
    first = autotune.select(moe, ladder=(1, 4, 32), rounds=2)
    keys = {str(s.key) for s in first}
    assert keys == {f"cpu|fp32|{DIM}x{HIDDEN}", f"cpu|fp32|{DIM}x16"}
    assert all(s.plan.source == "measured" and s.plan.limits == (1, 4, 32) for s in first)
    assert all(set(s.plan.ms[1]) >= {"xwt", "xwt_fused", "wxt"} for s in first)
    data = json.loads((tmp_path / "kernels.json").read_text())
    ((mkey, entries),) = data["machines"].items()
    assert mkey == kernel_cache.machine_key("cpu") and "threads=1" in mkey and f"torch={torch.__version__}" in mkey
    assert set(entries) == keys
    # A new process (plans cleared) takes the cached choice without measuring.
    kernel_plans.clear()
    again = autotune.select(moe, ladder=(1, 4, 32), rounds=2)
    assert all(s.plan.source == "cache" for s in again)
    assert {str(s.key): s.plan.names for s in again} == {str(s.key): s.plan.names for s in first}
    # Another thread count is another machine: measured again.
    kernel_plans.clear()
    torch.set_num_threads(2)
    try:
        assert all(s.plan.source == "measured" for s in autotune.select(moe, ladder=(1,), rounds=1))
    finally:
        torch.set_num_threads(1)
    assert len(json.loads((tmp_path / "kernels.json").read_text())["machines"]) == 2


def test_timings_disturbed_by_other_load_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "NOISY", 0.0)  # every median round counts as disturbed
    with pytest.warns(UserWarning, match="machine busy"):
        sel = autotune.select(small_moe(), ladder=(1, 2), rounds=3)
    assert sel and all(s.plan.source == "noisy" for s in sel)
    assert set(kernel_plans.plans()) == {s.key for s in sel}  # used in this process
    assert not (tmp_path / "kernels.json").exists()


def test_corrupt_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "NOISY", float("inf"))
    (tmp_path / "kernels.json").write_text("{not json")
    moe = small_moe()
    with pytest.warns(UserWarning, match="unreadable"):
        sel = autotune.select(moe, ladder=(2,), rounds=1)
    assert sel and all(s.plan.source == "measured" for s in sel)
    assert json.loads((tmp_path / "kernels.json").read_text())["version"] == kernel_cache.CACHE_VERSION


def test_default_mode_measures_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_MODE, "default")
    moe = small_moe()
    assert autotune.select(moe) == [] and kernel_plans.plans() == {}
    assert not (tmp_path / "kernels.json").exists()
    monkeypatch.setenv(autotune.ENV_MODE, "fastest")
    with pytest.raises(ValueError, match="UNIMOE_KERNELS='fastest'"):
        autotune.select(moe)


def test_a_candidate_that_computes_wrong_is_left_out(monkeypatch):
    mlp, _ = expert("fp32")

    def wrong(x, w, out=None):
        y = kernels.xwt(x, w, out)
        return y.mul_(1.01)

    monkeypatch.setitem(kernels.CANDIDATES, "wxt", kernels.Candidate("wxt", wrong, ("fp32",)))
    with pytest.warns(UserWarning, match="wxt left out"):
        plan = autotune.measure([mlp.expert_weights()], ladder=(1, 8), rounds=1)
    assert "wxt" not in plan.names and "wxt" not in plan.ms[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_selection_and_parity():
    moe = small_moe().cuda()
    convert_experts(moe, None, select=False)
    sel = autotune.select(moe, ladder=(1, 16, 256), rounds=2)
    assert {s.key.device for s in sel} == {"cuda"} and "capability=sm" in kernel_cache.machine_key("cuda")
    x = torch.randn(16, DIM, device="cuda")
    with torch.inference_mode():
        got, _ = moe(x)
    kernel_plans.clear()
    want, _ = moe(x)
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)
    w = moe.routed_experts[0].expert_weights()
    for name, c in kernels.CANDIDATES.items():
        if c.applies(w):
            torch.testing.assert_close(c.fn(x, w), kernels.xwt(x, w), rtol=1e-4, atol=1e-5)
