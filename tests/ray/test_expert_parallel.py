"""Expert parallelism on a local Ray: the actor-parallel model equals the in-process model
(training forward and cached decoding, compiled graph and plain calls, 1 and 2 replicas), live
scaling while decoding, routing statistics, and expert actors killed while requests run."""

import copy
import dataclasses
import time
from contextlib import contextmanager

import pytest
import ray
import torch

from unimoe_ray.inference.generate import SamplingConfig, generate
from unimoe_ray.model.unimoe_audio import IGNORE_INDEX, UniMoEAudio
from unimoe_ray.parallel import (
    ActorResources,
    ExpertParallelConfig,
    attach_experts,
    expert_status,
    launch_experts,
    scale_expert,
    shutdown_experts,
    start_trunk,
)
from unimoe_ray.parallel.weights import trunk_state
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompt import Prompt

pytestmark = pytest.mark.ray

GROUP = "test-expert-parallel"
# num_cpus=0: seven-plus actors share two cores; the test measures equality, not speed.
CFG = ExpertParallelConfig(
    group=GROUP,
    expert_resources=ActorResources(num_cpus=0),
    trunk_resources=ActorResources(num_cpus=0),
    max_restarts=1,
    topology_poll_s=0.0,  # poll at every step boundary
    stats_interval_s=3600.0,  # tests flush statistics explicitly
    restart_timeout_s=60.0,
    trunk_timeout_s=60.0,
)
ATOL = 1e-5  # fp32, docs/DESIGN.md §3: same weights and inputs → same logits
GREEDY = SamplingConfig(greedy=True, guidance_scale=2.0, max_frames=8)


@pytest.fixture(scope="module")
def model():
    # No vision tower: experts only see the decoder, and trunk actors start faster without it.
    return UniMoEAudio(get_preset("tiny").replace(vision=None)).init_weights(seed=0).eval()


@pytest.fixture(scope="module")
def controller(model):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    controller = launch_experts(model, CFG)
    yield controller
    shutdown_experts(GROUP, CFG.namespace)
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_replica_each(controller, model):
    for e in range(model.cfg.moe.num_routed):
        ray.get(controller.scale.remote(e, 1))


@contextmanager
def attached(model, **changes):
    """A copy of `model` whose routed experts run on the group's actors."""
    trunk = copy.deepcopy(model)
    experts = attach_experts(trunk, dataclasses.replace(CFG, **changes))
    try:
        yield trunk, experts
    finally:
        experts.close()


def batch(cfg, seed=1):
    """Two rows (the second left-padded): text, then audio frames at placeholder positions."""
    g = torch.Generator().manual_seed(seed)
    B, L, K = 2, 20, cfg.codec_channels
    ids = torch.randint(0, 400, (B, L), generator=g)
    ids[:, 8:] = cfg.codec_placeholder_id
    codes = torch.randint(0, cfg.codebook_size, (B, K, L), generator=g)
    labels = torch.full((B, K, L), IGNORE_INDEX)
    labels[:, :, 8:] = codes[:, :, 8:]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :3] = False
    return ids, codes, mask, labels


@torch.no_grad()
def logits(m, batch_):
    """Codec logits of a full-sequence forward on `batch(...)`'s inputs."""
    ids, codes, mask, _ = batch_
    return m(ids, codes, attention_mask_BL=mask).codec_logits_BLKV


def assert_equal_logits(m, batch_, ref):
    torch.testing.assert_close(logits(m, batch_), ref, rtol=0, atol=ATOL)


def prompts(n, seed=2):
    """n text prompts of 5-11 tokens and their 3-token negatives (for CFG)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 12, (n,), generator=g).tolist()
    pos = [Prompt(torch.randint(0, 400, (k,), generator=g)) for k in lengths]
    neg = [Prompt(torch.randint(0, 400, (3,), generator=g)) for _ in range(n)]
    return pos, neg


def decode_logits(m, cfg, steps=6):
    """Cached decoding driven by fixed frames: prefill, then one frame per step; logits of
    every step stacked (B, 1 + steps, K, V)."""
    ids, codes, mask, _ = batch(cfg)
    g = torch.Generator().manual_seed(3)
    cache = m.new_cache(ids.shape[0], ids.shape[1] + steps)
    with torch.inference_mode():
        out = [m(ids, codes, attention_mask_BL=mask, cache=cache, logits_last_only=True).codec_logits_BLKV]
        for _ in range(steps):
            frame = torch.randint(0, cfg.codebook_size, (ids.shape[0], cfg.codec_channels, 1), generator=g)
            step_ids = torch.full((ids.shape[0], 1), cfg.codec_placeholder_id)
            out.append(m(step_ids, frame, cache=cache, logits_last_only=True).codec_logits_BLKV)
    return torch.cat(out, dim=1)


# ---- equivalence ----


@pytest.mark.parametrize(
    "exchange, replicas, inband_max_bytes",
    [
        ("compiled", 1, None),
        ("compiled", 2, None),
        ("plain", 1, None),
        ("plain", 2, None),
        # Every message in the large-payload form (numpy views, zero-copy on the reader).
        ("compiled", 2, 0),
        ("plain", 1, 0),
    ],
)
def test_training_forward_matches_in_process(model, exchange, replicas, inband_max_bytes):
    scale_expert(1, replicas, GROUP)
    ids, codes, mask, labels = batch(model.cfg)
    wire_form = {} if inband_max_bytes is None else {"inband_max_bytes": inband_max_bytes}
    with attached(model, exchange=exchange, **wire_form) as (trunk, experts):
        assert experts.exchange_kind == exchange
        assert experts.topology.replica_counts == (1, replicas, 1, 1)
        with torch.no_grad():
            ref = model(ids, codes, attention_mask_BL=mask, labels_BKL=labels)
            out = trunk(ids, codes, attention_mask_BL=mask, labels_BKL=labels)
            torch.testing.assert_close(out.codec_logits_BLKV, ref.codec_logits_BLKV, rtol=0, atol=ATOL)
            torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=ATOL)
            # Train mode adds router jitter from the global RNG: the same seed gives both models
            # the same noise, so even jittered routing must agree.
            model.train(), trunk.train()
            try:
                torch.manual_seed(7)
                ref = model(ids, codes, attention_mask_BL=mask, labels_BKL=labels)
                torch.manual_seed(7)
                out = trunk(ids, codes, attention_mask_BL=mask, labels_BKL=labels)
            finally:
                model.eval()
            torch.testing.assert_close(out.codec_logits_BLKV, ref.codec_logits_BLKV, rtol=0, atol=ATOL)
            torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=0, atol=ATOL)
        assert sum(ref.moe_stats[0].counts) > 0
        assert experts.recoveries == 0


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("exchange", ["compiled", "plain"])
def test_cached_decoding_matches_in_process(model, exchange, replicas):
    scale_expert(1, replicas, GROUP)
    pos, neg = prompts(2)
    ref_logits = decode_logits(model, model.cfg)
    ref_codes = generate(model, pos, neg, GREEDY)
    with attached(model, exchange=exchange) as (trunk, experts):
        assert experts.topology.replica_counts[1] == replicas
        torch.testing.assert_close(decode_logits(trunk, model.cfg), ref_logits, rtol=0, atol=ATOL)
        codes = generate(trunk, pos, neg, GREEDY)
    for got, want in zip(codes, ref_codes):
        assert torch.equal(got, want)


def test_actor_experts_are_forward_only(model):
    ids, codes, mask, _ = batch(model.cfg)
    with attached(model) as (trunk, _):
        with pytest.raises(RuntimeError, match="forward-only"):
            trunk(ids, codes, attention_mask_BL=mask)  # grad enabled: gradients would be lost


def test_second_trunk_on_a_group_uses_plain_calls(model):
    """An actor joins one compiled graph at a time, so one trunk per group drives a graph."""
    inputs = batch(model.cfg)
    ref = logits(model, inputs)
    with attached(model) as (t1, e1), attached(model) as (t2, e2):
        assert (e1.exchange_kind, e2.exchange_kind) == ("compiled", "plain")
        for t in (t1, t2, t1):
            assert_equal_logits(t, inputs, ref)
        assert expert_status(GROUP).graph_owner == e1.trunk_id


def test_idle_compiled_graph_is_parked_and_rebuilt(model):
    """An idle compiled graph is torn down (its CPU channels busy-wait) and comes back on use."""
    inputs = batch(model.cfg)
    ref = logits(model, inputs)
    # 2 s: long enough that no gap inside one forward (a loaded 2-core CI box) parks the graph.
    with attached(model, graph_idle_s=2.0) as (trunk, experts):
        assert_equal_logits(trunk, inputs, ref)
        deadline = time.monotonic() + 30
        while not experts.parked and time.monotonic() < deadline:
            time.sleep(0.1)
        assert experts.parked
        assert_equal_logits(trunk, inputs, ref)
        assert experts.exchange_kind == "compiled" and experts.recoveries == 0 and experts.compiles == 2


# ---- scaling ----


def wait_dead(actor, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.info.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.2)
    raise AssertionError("the retired replica is still alive")


@pytest.mark.parametrize("exchange", ["compiled", "plain"])
def test_scale_up_and_down_while_decoding(model, controller, exchange):
    pos, neg = prompts(2, seed=4)
    ref_codes = generate(model, pos, neg, GREEDY)
    seen, retired = [], []
    with attached(model, exchange=exchange) as (trunk, experts):

        def admin(module, args):  # runs after attach's step-boundary sync, like an admin would
            step = len(seen)
            if step == 3:
                scale_expert(2, 2, GROUP)
            if step == 10:
                retired.append(ray.get(controller.topology.remote()).replicas[2][1])
                scale_expert(2, 1, GROUP)
            seen.append(experts.topology.replica_counts[2])

        hook = trunk.register_forward_pre_hook(admin)
        codes = generate(trunk, pos, neg, GREEDY)
        hook.remove()
        assert experts.recoveries == 0
    for got, want in zip(codes, ref_codes):
        assert torch.equal(got, want)  # no request lost or changed by the topology switches
    assert seen[:4] == [1, 1, 1, 1] and 2 in seen[4:11] and seen[-1] == 1
    wait_dead(retired[0])  # killed once the trunk switched away from it


def test_status_reports_replicas_nodes_and_routing(model):
    scale_expert(0, 2, GROUP)
    ids, codes, mask, _ = batch(model.cfg, seed=5)
    before = expert_status(GROUP)
    with attached(model) as (trunk, experts):
        with torch.no_grad():
            out = trunk(ids, codes, attention_mask_BL=mask)
        ray.get(experts.flush_stats())
        after = expert_status(GROUP)
    routed_E = [sum(s.counts[e] for s in out.moe_stats) for e in range(model.cfg.moe.num_routed)]
    assert [a.tokens - b.tokens for a, b in zip(after.experts, before.experts)] == routed_E
    node_ip = ray.util.get_node_ip_address()
    assert [(r.replicas, r.nodes) for r in after.experts] == [(2, (node_ip, node_ip))] + [(1, (node_ip,))] * 3
    assert len(set(after.experts[0].actor_ids)) == 2
    assert after.trunks == 1 and after.graph_owner == experts.trunk_id
    for k, routed in zip(after.experts_per_token_L, after.routed_per_token_L):
        assert 1.0 <= k <= model.cfg.moe.num_dynamic and 0.0 <= routed <= k


# ---- faults ----


def test_killed_expert_restarts_while_requests_run(model, controller):
    """A trunk actor decodes three requests; an expert actor is killed (Ray restarts it from
    the controller-owned weights) mid-way; every request still returns the exact output."""
    pos, neg = prompts(3, seed=6)
    sampling = dataclasses.replace(GREEDY, max_frames=16)
    refs_codes = [generate(model, [p], [n], sampling)[0] for p, n in zip(pos, neg)]
    trunk = start_trunk(model.cfg, trunk_state(model), CFG)
    try:
        requests = [trunk.generate.remote([p], [n], sampling) for p, n in zip(pos, neg)]
        while ray.get(trunk.info.remote())["steps"] < 5:  # info answers while a request decodes
            time.sleep(0.05)
        victim = ray.get(controller.topology.remote()).replicas[1][0]
        pid = ray.get(victim.info.remote())["pid"]
        ray.kill(victim, no_restart=False)
        results = ray.get(requests, timeout=300)
        info = ray.get(trunk.info.remote())
        ray.get(trunk.close.remote())
    finally:
        ray.kill(trunk)
    for (got,), want in zip(results, refs_codes):
        assert torch.equal(got, want)
    assert info["exchange"] == "compiled" and info["recoveries"] >= 1
    assert ray.get(victim.info.remote())["pid"] != pid  # the same replica, restarted
    assert ray.get(controller.topology.remote()).replica_counts == (1, 1, 1, 1)


@pytest.mark.parametrize("exchange", ["compiled", "plain"])
def test_dead_replica_is_dropped_and_last_replica_replaced(model, exchange):
    inputs = batch(model.cfg, seed=8)
    ref = logits(model, inputs)
    scale_expert(3, 2, GROUP)
    with attached(model, exchange=exchange) as (trunk, experts):
        ray.kill(experts.topology.replicas[3][0], no_restart=True)  # gone for good
        assert_equal_logits(trunk, inputs, ref)
        assert experts.recoveries >= 1 and experts.topology.replica_counts[3] == 1
        last = experts.topology.replicas[3][0]
        last_id = ray.get(last.info.remote())["actor_id"]
        ray.kill(last, no_restart=True)  # the expert's only replica: the controller starts anew
        assert_equal_logits(trunk, inputs, ref)
        assert experts.topology.replica_counts[3] == 1
        assert ray.get(experts.topology.replicas[3][0].info.remote())["actor_id"] != last_id


def test_lease_passes_from_a_vanished_trunk_to_fresh_replicas(model):
    """A trunk actor killed without tearing its graph down leaves every replica waiting in that
    graph; the next trunk asking for a compiled graph gets the lease over fresh replicas."""
    inputs = batch(model.cfg, seed=9)
    ids, codes, mask, _ = inputs
    ref = logits(model, inputs)
    trunk = start_trunk(model.cfg, trunk_state(model), CFG)
    out = ray.get(trunk.forward.remote(ids, codes, attention_mask_BL=mask))
    torch.testing.assert_close(out["codec_logits_BLKV"], ref, rtol=0, atol=ATOL)
    old_ids = {a for row in expert_status(GROUP).experts for a in row.actor_ids}
    ray.kill(trunk)
    with attached(model) as (t, experts):
        assert experts.exchange_kind == "compiled"
        assert_equal_logits(t, inputs, ref)
        status = expert_status(GROUP)
    assert status.graph_owner == experts.trunk_id
    assert not old_ids & {a for row in status.experts for a in row.actor_ids}
