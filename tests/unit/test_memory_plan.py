"""The training memory plan: its parameter / gradient / optimizer bytes are those of a real sharded
model and its AdamW state after a step; ZeRO and EP divide what they should; bad sizes named."""

from __future__ import annotations

import pytest
import torch

from unimoe_ray.model.expert_parallel import ExpertParallelGroups, shard_experts
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.train.integrate import apply_trainable
from unimoe_ray.train.memory_plan import GIB, markdown_table, plan, plan_grid


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("trainable", ["all", "router_and_shared"])
def test_plan_matches_a_sharded_model_and_its_adamw_state(tiny_cfg, trainable):
    W, N = 4, 2
    model = UniMoEAudio(tiny_cfg)
    apply_trainable(model, trainable)
    model.lm_head.weight.requires_grad_(False)
    shard_experts(
        model,
        ExpertParallelGroups(
            world_size=W, rank=1, ep_size=N, ep_group=None, edp_group=None, ep_ranks=(0, 1), edp_ranks=(1, 3)
        ),
    )
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    for p in trainable_params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(trainable_params)
    opt.step()
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    m = plan(tiny_cfg, workers=W, expert_parallel=N, seq_len=64, dtype="fp32", trainable=trainable)
    assert m.params == _nbytes(model.parameters())
    assert m.grads == _nbytes(p.grad for p in trainable_params)
    assert m.optimizer == _nbytes(moments)
    experts = [p for n, p in model.named_parameters() if ".routed_experts." in n]
    assert m.expert_params == _nbytes(experts)
    assert m.runs_in_trainer


def test_zero_and_expert_parallel_divide_their_parts():
    cfg = get_preset("preview")
    base = plan(cfg, workers=8, expert_parallel=1, seq_len=1024)
    ep = plan(cfg, workers=8, expert_parallel=8, seq_len=1024)
    assert ep.expert_params * 8 == base.expert_params  # each rank holds 1/8 of the experts
    assert ep.params - ep.expert_params == base.params - base.expert_params
    z2 = plan(cfg, workers=8, expert_parallel=1, zero_stage=2, seq_len=1024)
    # ZeRO-2 over 8 ranks: gradients and optimizer state 1/8 each (rounded up), parameters whole.
    assert z2.params == base.params and base.grads / 8 <= z2.grads < base.grads / 8 + 64
    assert base.optimizer / 8 <= z2.optimizer < base.optimizer / 8 + 64 and z2.runs_in_trainer
    assert not plan(cfg, workers=8, expert_parallel=8, zero_stage=2, seq_len=1024).runs_in_trainer
    assert plan(cfg, workers=8, seq_len=2048).activations == 2 * base.activations
    with pytest.raises(ValueError, match="size 3 must divide the 8 workers and the 8 routed experts"):
        plan(cfg, workers=8, expert_parallel=3)


def test_the_grid_leaves_out_layouts_that_do_not_divide(tiny_cfg):
    assert tiny_cfg.moe.num_routed == 4
    rows = plan_grid(tiny_cfg, workers=[2, 4, 6], expert_parallel=[1, 3, 4], zero_stages=[0, 2], seq_len=64)
    assert [(r["workers"], r["expert_parallel"], r["zero"]) for r in rows] == [
        (2, 1, 0),
        (2, 1, 2),
        (4, 1, 0),
        (4, 1, 2),
        (4, 4, 0),
        (4, 4, 2),
        (6, 1, 0),
        (6, 1, 2),
    ]
    assert rows[5] == {
        "workers": 4,
        "expert_parallel": 4,
        "zero": 2,
        **plan(tiny_cfg, workers=4, expert_parallel=4, zero_stage=2, seq_len=64).as_dict(),
    }


def test_the_table_shows_gib_what_fits_and_what_if():
    row = dict(
        workers=8,
        expert_parallel=2,
        zero=2,
        params=3 * GIB,
        expert_params=GIB,
        grads=GIB // 2,
        optimizer=2 * GIB,
        activations=GIB // 4,
        runs_in_trainer=False,
    )
    rows = [{**row, "total": 6 * GIB}, {**row, "zero": 0, "runs_in_trainer": True, "total": 5 * GIB}]
    assert markdown_table(rows, device_gib=5).splitlines() == [
        "| W | N | ZeRO | params (experts) | grads | AdamW | activations | total | fits 5 GiB |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 8 | 2 | 2 (what-if) | 3.0 (1.0) | 0.5 | 2.0 | 0.2 | 6.0 | no |",
        "| 8 | 2 | 0 | 3.0 (1.0) | 0.5 | 2.0 | 0.2 | 5.0 | yes |",
    ]
