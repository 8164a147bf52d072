"""Expert-parallel pieces that need no Ray cluster: replica splitting, routing statistics,
actor options (CPU / GPU / NPU by configuration only), the trunk/expert weight split, the wire
format, and the expert actor's computation run as a plain object."""

import copy

import numpy as np
import pytest
import torch

from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel import wire
from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.expert_actor import ExpertWorker
from unimoe_ray.parallel.resources import (
    EXPERT_NODE_RESOURCE,
    NPU_RESOURCE,
    TRUNK_NODE_RESOURCE,
    ActorResources,
    actor_options,
)
from unimoe_ray.parallel.routing_stats import RoutingAccumulator, RoutingSample, RoutingWindow
from unimoe_ray.parallel.status import ExpertRow, ExpertStatus, format_status
from unimoe_ray.parallel.topology import slot_rows, split_rows
from unimoe_ray.parallel.weights import (
    build_trunk,
    expert_state,
    load_expert_state,
    load_trunk_state,
    strip_routed_experts,
    trunk_state,
)
from unimoe_ray.parallel.wire import ExpertCall, decode_call, encode_call, encode_reply, pack, unpack, write_into
from unimoe_ray.presets import get_preset


@pytest.fixture(scope="module")
def model():
    return UniMoEAudio(get_preset("tiny")).init_weights(seed=0).eval()


# ---- replica splitting ----


def test_split_rows_is_near_equal_and_contiguous():
    assert split_rows(10, 3) == [4, 3, 3]
    assert split_rows(2, 3) == [1, 1, 0]
    assert split_rows(0, 2) == [0, 0]


def test_slot_rows_follow_expert_grouping():
    assert slot_rows((5, 0, 3), (1, 2, 2)) == [(0, 5), (5, 0), (5, 0), (5, 2), (7, 1)]
    with pytest.raises(ValueError, match="3 expert counts for 2 experts"):
        slot_rows((1, 2, 3), (1, 1))


# ---- routing statistics ----


def test_accumulator_counts_tokens_picks_and_routed_assignments():
    acc = RoutingAccumulator(num_routed=3, num_layers=2)
    assert acc.take() is None
    acc.add(0, torch.tensor([1, 2, 3]), (2, 1, 0))  # 3 tokens, 6 picks, 3 routed (3 null)
    acc.add(1, torch.tensor([1, 1]), (0, 1, 1))
    acc.add(0, torch.tensor([2]), (1, 1, 0))
    assert acc.take() == RoutingSample(tokens_E=(3, 3, 1), tokens_L=(4, 2), picks_L=(8, 2), routed_L=(5, 2))
    assert acc.take() is None  # reset after take


def test_window_means_and_expiry():
    w = RoutingWindow(num_routed=2, num_layers=2, window_s=10.0)
    w.add(RoutingSample(tokens_E=(4, 2), tokens_L=(4, 2), picks_L=(8, 2), routed_L=(4, 2)), now=0.0)
    w.add(RoutingSample(tokens_E=(0, 2), tokens_L=(4, 0), picks_L=(4, 0), routed_L=(2, 0)), now=5.0)
    t = w.totals(now=6.0)
    assert t.tokens_E == (4, 4)
    assert t.experts_per_token_L == (12 / 8, 1.0)
    assert t.routed_per_token_L == (6 / 8, 1.0)
    t = w.totals(now=12.0)  # the first sample left the window
    assert t.tokens_E == (0, 2)
    assert t.experts_per_token_L == (1.0, 0.0)


def test_status_table_lists_every_expert():
    s = ExpertStatus(
        group="g",
        version=3,
        window_s=60.0,
        experts=(
            ExpertRow(expert=0, replicas=2, nodes=("10.0.0.1", "10.0.0.2"), actor_ids=("a", "b"), tokens=30),
            ExpertRow(expert=1, replicas=1, nodes=("10.0.0.1",), actor_ids=("c",), tokens=10),
        ),
        experts_per_token_L=(1.5, 2.0),
        routed_per_token_L=(1.0, 1.25),
        trunks=1,
        graph_owner="t",
    )
    text = format_status(s)
    assert " 75.0%  10.0.0.1, 10.0.0.2" in text and " 25.0%  10.0.0.1" in text
    assert "1.50 2.00" in text and "1.00 1.25" in text


# ---- placement by configuration ----


def test_actor_options_cpu_gpu_npu():
    cpu = ActorResources(num_cpus=4, node_resource=EXPERT_NODE_RESOURCE)
    assert cpu.device == "cpu" and cpu.torch_threads == 4
    assert actor_options(cpu, max_restarts=3) == {
        "num_cpus": 4,
        "num_gpus": 0.0,
        "resources": {EXPERT_NODE_RESOURCE: 1.0},
        "max_restarts": 3,
    }
    gpu = ActorResources(num_cpus=1, num_gpus=1, node_resource=EXPERT_NODE_RESOURCE, node_resource_amount=0.5)
    assert gpu.device == "cuda"
    assert actor_options(gpu) == {"num_cpus": 1, "num_gpus": 1, "resources": {EXPERT_NODE_RESOURCE: 0.5}}
    npu = ActorResources(num_cpus=2, npus=1, node_resource=TRUNK_NODE_RESOURCE)
    assert npu.device == "npu"
    assert actor_options(npu) == {
        "num_cpus": 2,
        "num_gpus": 0.0,
        "resources": {NPU_RESOURCE: 1, TRUNK_NODE_RESOURCE: 1.0},
    }
    assert actor_options(ActorResources(num_cpus=0.5)) == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert ActorResources(num_cpus=0.5).torch_threads == 1
    with pytest.raises(ValueError, match="GPUs or NPUs"):
        ActorResources(num_gpus=1, npus=1)


def test_default_config_places_experts_and_trunk_on_their_node_groups():
    cfg = ExpertParallelConfig()
    assert actor_options(cfg.expert_resources)["resources"] == {EXPERT_NODE_RESOURCE: 1.0}
    assert actor_options(cfg.trunk_resources)["resources"] == {TRUNK_NODE_RESOURCE: 1.0}
    assert cfg.controller_name == "unimoe_experts:default"
    with pytest.raises(ValueError, match="exchange"):
        ExpertParallelConfig(exchange="nccl")
    with pytest.raises(ValueError, match="initial_replicas"):
        ExpertParallelConfig(initial_replicas=0)


# ---- weights ----


def test_trunk_and_expert_states_partition_the_model(model):
    full = model.state_dict()
    trunk = trunk_state(model)
    experts = [expert_state(model, e) for e in range(model.cfg.moe.num_routed)]
    assert len(trunk) + sum(len(s) for s in experts) == len(full)
    assert sorted(experts[2]) == sorted(
        f"{layer}.{p}.weight" for layer in range(model.cfg.num_layers) for p in ("down_proj", "gate_proj", "up_proj")
    )
    torch.testing.assert_close(
        experts[2]["1.up_proj.weight"], full["language_model.layers.1.mlp.routed_experts.2.up_proj.weight"]
    )


def test_checkpoint_halves_equal_in_memory_halves(model, tmp_path):
    save_pretrained(model, tmp_path)
    for e in (0, 3):
        disk, mem = load_expert_state(tmp_path, e), expert_state(model, e)
        assert disk.keys() == mem.keys()
        for k in mem:
            torch.testing.assert_close(disk[k], mem[k], rtol=0, atol=0)
    assert load_trunk_state(tmp_path).keys() == trunk_state(model).keys()
    with pytest.raises(ValueError, match="routed expert 9"):
        load_expert_state(tmp_path, 9)


def test_built_trunk_has_no_expert_memory_and_fails_loudly_without_backend(model, tmp_path):
    save_pretrained(model, tmp_path)
    trunk = build_trunk(model.cfg, str(tmp_path))
    routed = [p for moe in trunk.moe_layers for p in moe.routed_experts.parameters()]
    assert routed and all(p.is_meta for p in routed)
    for k, v in trunk_state(model).items():
        torch.testing.assert_close(trunk.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="live in Ray actors"):
        trunk(torch.randint(0, 400, (1, 6)))  # no expert backend yet: no silent output
    bad = dict(trunk_state(model))
    bad.pop("lm_head.weight")
    with pytest.raises(ValueError, match="1 missing"):
        build_trunk(model.cfg, bad)


def test_strip_frees_routed_experts_only(model):
    m = copy.deepcopy(model)
    strip_routed_experts(m)
    assert all(p.is_meta for moe in m.moe_layers for p in moe.routed_experts.parameters())
    assert not any(p.is_meta for moe in m.moe_layers for p in moe.shared_experts.parameters())


# ---- wire format and the expert's computation ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inband_max", [wire.INBAND_MAX_BYTES, 0])
def test_wire_roundtrip(dtype, inband_max):
    # Small messages travel as raw bytes, large ones as an ExpertCall with a numpy view.
    x = torch.randn(5, 8).to(dtype)
    b = pack(x)
    assert b.shape == (5, 8 * x.element_size())
    torch.testing.assert_close(unpack(b, dtype), x, rtol=0, atol=0)
    msg = encode_call(3, b, dtype, inband_max)
    assert isinstance(msg, bytes if inband_max else ExpertCall)
    layer, got = decode_call(msg)
    assert layer == 3 and got.dtype == dtype
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    reply = encode_reply(x, inband=isinstance(msg, bytes))
    assert isinstance(reply, bytes if inband_max else np.ndarray)
    y = torch.empty_like(x)
    write_into(y, reply)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bytes where"):
        write_into(torch.empty(4, 8, dtype=dtype), reply)


def test_expert_worker_computes_its_expert_for_any_layer(model, tmp_path):
    save_pretrained(model, tmp_path)
    for state in (expert_state(model, 1), str(tmp_path)):
        worker = ExpertWorker(expert_idx=1, state=state)
        for layer in range(model.cfg.num_layers):
            x = torch.randn(7, model.cfg.hidden_size)
            y = torch.empty_like(x)
            write_into(y, worker.call(encode_call(layer, pack(x), x.dtype, wire.INBAND_MAX_BYTES)))
            with torch.no_grad():
                ref = model.moe_layers[layer].routed_experts[1](x)
            torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert worker.call(None) is None  # an idle replica returns without computing
