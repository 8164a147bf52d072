"""Attaching a model to an expert group checks it against the group's fingerprint (expert
shapes and layers, routers, each expert's weights) before touching the model: a model of
another depth, width or with other weights is refused with a message naming the difference."""

import copy

import pytest
import ray
import torch

from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel import ActorResources, ExpertParallelConfig, attach_experts, launch_experts, shutdown_experts
from unimoe_ray.parallel.weights import build_trunk, trunk_state
from unimoe_ray.presets import get_preset

pytestmark = pytest.mark.ray

CFG = ExpertParallelConfig(group="test-attach", exchange="plain", expert_resources=ActorResources(num_cpus=0))
TINY = get_preset("tiny").replace(vision=None)


def make(seed=0, **changes):
    return UniMoEAudio(TINY.replace(**changes)).init_weights(seed=seed).eval()


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.fixture(scope="module")
def group(model):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    launch_experts(model, CFG)
    yield
    shutdown_experts(CFG.group, CFG.namespace)
    ray.shutdown()


@torch.no_grad()
def codec_logits(m):
    ids = torch.arange(10).reshape(1, 10) % 300
    return m(ids).codec_logits_BLKV


def assert_refused(other, match):
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        attach_experts(other, CFG)
    after = other.state_dict()
    assert all(not after[k].is_meta and torch.equal(after[k], v) for k, v in before.items())  # untouched


def test_model_of_other_depth_is_refused(group):
    assert_refused(make(num_layers=4), r"DCMoE layers: the model has 4 \(0..3\), the group 2 \(0..1\)")


def test_model_of_other_width_is_refused(group):
    other = make(hidden_size=64, mrope_section=(4, 2, 2))
    assert_refused(other, "hidden size: the model has 64, the group 32")


def test_model_with_other_expert_weights_is_refused(group, model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.moe_layers[1].routed_experts[2].down_proj.weight.mul_(1.01)
    assert_refused(other, r"weights of routed expert\(s\) \[2\] differ from the group's")
    assert_refused(make(seed=1), r"routed expert\(s\) \[0, 1, 2, 3\] differ")


def test_stripped_trunk_with_other_weights_is_refused_by_its_routers(group):
    trunk = build_trunk(TINY, trunk_state(make(seed=1)))
    with pytest.raises(ValueError, match="router weights differ from the group's"):
        attach_experts(trunk, CFG)


def test_matching_models_attach_and_compute(group, model):
    ref = codec_logits(model)
    for m in (copy.deepcopy(model), build_trunk(TINY, trunk_state(model))):
        experts = attach_experts(m, CFG)
        try:
            torch.testing.assert_close(codec_logits(m), ref, rtol=0, atol=1e-5)
        finally:
            experts.close()


def test_group_launched_from_a_checkpoint_checks_the_same_way(group, model, tmp_path):
    save_pretrained(model, tmp_path)
    cfg = ExpertParallelConfig(group="test-attach-ckpt", exchange="plain", expert_resources=ActorResources(num_cpus=0))
    launch_experts(str(tmp_path), cfg)
    try:
        experts = attach_experts(copy.deepcopy(model), cfg)
        experts.close()
        with pytest.raises(ValueError, match=r"routed expert\(s\) \[0, 1, 2, 3\] differ"):
            attach_experts(make(seed=1), cfg)
    finally:
        shutdown_experts(cfg.group, cfg.namespace)
