"""An expert group survives its own control plane, on a cluster its experts fill: SIGKILL of the
controller's process during decoding (identical codes, replicas adopted, admin calls meanwhile
get a "restarting, retry" error); a scale-up that cannot be placed fails at once in one line,
takes nothing from a replica being restarted, and does not block attaches; a replica dead for
good is never listed as serving; a compiled-graph holder that crashed is detected and a new
compiled attach succeeds with no room for a second set of experts.

Every kill is a SIGKILL of the OS process, as a crash or the OOM killer would do it."""

import copy
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager

import pytest
import ray
import torch

from unimoe_ray.apps.cli import main
from unimoe_ray.inference.generate import SamplingConfig, generate
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel import (
    ActorResources,
    ExpertParallelConfig,
    ExpertUnavailableError,
    attach_experts,
    expert_status,
    launch_experts,
    scale_expert,
    shutdown_experts,
)
from unimoe_ray.parallel.admin import ControllerUnavailableError, get_controller
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompt import Prompt

pytestmark = pytest.mark.ray

GROUP = "test-restart"
# The cluster offers 5 `slot`s and each replica takes one: with expert 2 on two replicas the group
# fills the cluster. Every test starts and ends that way.
SLOTS = 5
FULL = (1, 1, 2, 1)
CFG = ExpertParallelConfig(
    group=GROUP,
    expert_resources=ActorResources(num_cpus=0, node_resource="slot"),
    max_restarts=1,
    topology_poll_s=0.0,
    stats_interval_s=3600.0,
    restart_timeout_s=60.0,
    placement_timeout_s=3.0,
)
SAMPLING = SamplingConfig(greedy=True, guidance_scale=2.0, max_frames=12)


@pytest.fixture(scope="module")
def model():
    return UniMoEAudio(get_preset("tiny").replace(vision=None)).init_weights(seed=0).eval()


@pytest.fixture(scope="module")
def controller(model):
    ray.init(address="local", num_cpus=4, resources={"slot": SLOTS}, include_dashboard=False, log_to_driver=False)
    launch_experts(model, CFG)
    scale_expert(2, 2, GROUP)
    yield
    shutdown_experts(GROUP, CFG.namespace)
    ray.shutdown()


@contextmanager
def attached(model, **changes):
    trunk = copy.deepcopy(model)
    experts = attach_experts(trunk, dataclasses.replace(CFG, **changes))
    try:
        yield trunk, experts
    finally:
        experts.close()


def prompts(seed):
    g = torch.Generator().manual_seed(seed)
    pos = [Prompt(torch.randint(0, 400, (k,), generator=g)) for k in (6, 9)]
    neg = [Prompt(torch.randint(0, 400, (3,), generator=g)) for _ in range(2)]
    return pos, neg


def replica_pid(expert):
    return ray.get(ray.get(get_controller(GROUP).topology.remote()).replicas[expert][0].info.remote())["pid"]


def actor_state(actor_id):
    """ALIVE, RESTARTING, DEAD, ... as the GCS has it."""
    return ray._private.state.actors(actor_id=actor_id)["State"]


def controller_pid():
    return ray._private.state.actors(actor_id=get_controller(GROUP)._actor_id.hex())["Pid"]


def wait_for(predicate, what, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def restore_full():
    """Expert 2 back on two replicas (FULL) for the next test, once the controller is up and the
    slot of the replica a test retired is free again: both wait on Ray's reaping and restarts,
    which take longer than the group's 3 s placement timeout on a loaded machine."""

    def scaled():
        try:
            scale_expert(2, 2, GROUP)
            return True
        except (ControllerUnavailableError, ExpertUnavailableError):
            return False

    wait_for(scaled, "expert 2 back on two replicas (the controller up, the retired replica's slot free)")


def serving_ids():
    return [row.actor_ids for row in expert_status(GROUP).experts]


# ---- the controller dies ----


def test_decoding_continues_through_a_controller_kill(controller, model):
    pos, neg = prompts(1)
    ref = generate(model, pos, neg, SAMPLING)
    before, old_pid, killed = serving_ids(), controller_pid(), []
    try:
        with attached(model) as (trunk, experts):

            def kill_controller(module, args):
                if experts.steps == 4:
                    os.kill(old_pid, signal.SIGKILL)
                    killed.append(True)

            hook = trunk.register_forward_pre_hook(kill_controller)
            codes = generate(trunk, pos, neg, SAMPLING)
            hook.remove()
            assert killed and experts.recoveries == 0  # the data path never needed the controller
            assert experts.exchange_kind == "compiled"
            # A new process, ALIVE: the GCS may still list the killed one as ALIVE for a while.
            wait_for(
                lambda: controller_pid() != old_pid and actor_state(get_controller(GROUP)._actor_id.hex()) == "ALIVE",
                "the controller's restart",
            )
            # The restarted controller adopted the running replicas (none replaced), and the trunk
            # still follows its topology: a scale made now reaches it at a later step boundary
            # (the poll never waits, so how many steps that takes depends on the machine's load;
            # every generation meanwhile gives the exact codes).
            assert serving_ids() == before
            scale_expert(2, 1, GROUP)
            agains = []

            def adopted():
                agains.append(generate(trunk, pos, neg, SAMPLING))
                return experts.topology.replica_counts == (1, 1, 1, 1)

            wait_for(adopted, "the trunk to adopt the scaled-down topology", 60)
        for got, want in zip(codes, ref):
            assert torch.equal(got, want)
        for again in agains:
            for got, want in zip(again, ref):
                assert torch.equal(got, want)
    finally:
        restore_full()


def test_admin_calls_while_the_controller_restarts_get_a_retry_error(controller, capsys):
    handle = get_controller(GROUP)
    os.kill(controller_pid(), signal.SIGKILL)
    wait_for(lambda: actor_state(handle._actor_id.hex()) != "ALIVE", "the GCS to see the controller die", 30)
    with pytest.raises(SystemExit) as exit_info:
        main(["experts", "status", "--group", GROUP])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is restarting" in err[0] and "retry" in err[0]
    wait_for(lambda: actor_state(handle._actor_id.hex()) == "ALIVE", "the controller's restart")
    assert tuple(row.replicas for row in expert_status(GROUP).experts) == FULL


def test_topology_change_while_a_replica_restarts_does_not_fail_decoding(controller, model):
    """Found by benchmarks/expert_chaos.py: a scale lands while a replica is restarting, so
    rebuilding the compiled graph at the step boundary meets an unavailable actor; that is a
    fault to heal, not a failed generation (nor a graph left built for the old topology)."""
    pos, neg = prompts(4)
    ref = generate(model, pos, neg, SAMPLING)
    victim, victim_id = replica_pid(0), expert_status(GROUP).experts[0].actor_ids[0]
    try:
        with attached(model) as (trunk, experts):

            def chaos(module, args):
                if experts.steps == 3:
                    scale_expert(2, 1, GROUP)  # a new topology ...
                    os.kill(victim, signal.SIGKILL)
                    wait_for(lambda: actor_state(victim_id) != "ALIVE", "the GCS to see expert 0 die", 30)
                    experts.refresh()  # ... adopted at a step boundary while expert 0 restarts

            hook = trunk.register_forward_pre_hook(chaos)
            codes = generate(trunk, pos, neg, SAMPLING)
            hook.remove()
            # Building the new graph either met expert 0 still restarting (a fault, healed:
            # recoveries >= 1) or, on a quick restart, waited for it (Ray queues calls to a
            # restarting actor). Either way: the new topology, a graph built again for it (not
            # the old one kept), and the exact codes.
            assert experts.topology.replica_counts == (1, 1, 1, 1) and experts.compiles >= 2
        for got, want in zip(codes, ref):
            assert torch.equal(got, want)
        wait_for(lambda: replica_pid(0) != victim, "expert 0's restart")
    finally:
        restore_full()


# ---- placement: repair first, scale fails fast, status honest ----


def test_scale_cannot_steal_a_restarting_replicas_resources(controller, model):
    """Expert 1's process is killed while a scale-up waits for room: Ray restarts expert 1 in
    its own reserved bundle, the scale fails at once naming the missing resource, decoding
    returns the exact codes, and an attach is not blocked by the pending scale."""
    pos, neg = prompts(2)
    ref = generate(model, pos, neg, SAMPLING)
    victim = replica_pid(1)
    outcome = {}

    def scale():
        try:
            scale_expert(0, 2, GROUP)
            outcome["scaled"] = True
        except ExpertUnavailableError as err:
            outcome["error"] = str(err)

    with attached(model, exchange="plain") as (trunk, experts):

        def chaos(module, args):
            if experts.steps == 3:
                os.kill(victim, signal.SIGKILL)
                threading.Thread(target=scale, daemon=True).start()

        hook = trunk.register_forward_pre_hook(chaos)
        codes = generate(trunk, pos, neg, SAMPLING)
        hook.remove()
        assert experts.recoveries >= 1
    for got, want in zip(codes, ref):
        assert torch.equal(got, want)
    wait_for(lambda: outcome, "the scale to end")
    assert "scaled" not in outcome
    assert outcome["error"].startswith("expert 0: cannot place 1 more replica(s) within 3s")
    assert "short of ['slot']" in outcome["error"] and "\n" not in outcome["error"]
    assert replica_pid(1) != victim  # restarted, in its own bundle
    assert tuple(row.replicas for row in expert_status(GROUP).experts) == FULL


def test_pending_scale_does_not_block_attach(controller, model):
    done = threading.Event()
    errors = []

    def scale():
        try:
            scale_expert(3, 3, GROUP)
        except ExpertUnavailableError as err:
            errors.append(err)
        done.set()

    thread = threading.Thread(target=scale, daemon=True)
    thread.start()
    time.sleep(0.5)  # let the scale start waiting for its bundles
    with attached(model, exchange="plain") as (trunk, experts):
        attached_while_scale_pending = not done.is_set()
    thread.join(60)
    assert attached_while_scale_pending and errors


def test_replica_dead_for_good_is_not_listed_and_is_replaced_in_its_bundle(controller, model):
    pos, neg = prompts(3)
    ref = generate(model, pos, neg, SAMPLING)
    dead_id = expert_status(GROUP).experts[3].actor_ids[0]
    for _ in range(CFG.max_restarts + 1):  # every restart used up
        os.kill(replica_pid(3), signal.SIGKILL)
        wait_for(lambda: actor_state(dead_id) != "ALIVE", "the GCS to see the replica die", 30)
        wait_for(lambda: actor_state(dead_id) in ("ALIVE", "DEAD"), "the replica's restart or death")
    assert actor_state(dead_id) == "DEAD"
    row = expert_status(GROUP).experts[3]
    assert (row.replicas, row.actor_ids) == (0, ())  # not listed as serving
    with attached(model, exchange="plain") as (trunk, experts):
        codes = generate(trunk, pos, neg, SAMPLING)  # heals: a new replica in the dead one's bundle
    for got, want in zip(codes, ref):
        assert torch.equal(got, want)
    row = expert_status(GROUP).experts[3]
    assert row.replicas == 1 and row.actor_ids[0] != dead_id


# ---- a crashed compiled-graph holder ----

HOLDER = textwrap.dedent(f"""
    import copy, sys, time
    import ray, torch
    from unimoe_ray.presets import get_preset
    from unimoe_ray.model.unimoe_audio import UniMoEAudio
    from unimoe_ray.parallel import ActorResources, ExpertParallelConfig, attach_experts

    ray.init(address=sys.argv[1], log_to_driver=False)
    cfg = ExpertParallelConfig(group={GROUP!r}, expert_resources=ActorResources(num_cpus=0, node_resource="slot"))
    model = UniMoEAudio(get_preset("tiny").replace(vision=None)).init_weights(seed=0).eval()
    experts = attach_experts(model, cfg)
    with torch.no_grad():
        model(torch.arange(10).reshape(1, 10))
    print(experts.exchange_kind, flush=True)
    time.sleep(3600)
""")


def test_crashed_compiled_holder_is_cleared_and_a_compiled_attach_succeeds(controller, model):
    """A driver holding the group's compiled graph is SIGKILLed (its graph never torn down). On
    a cluster with no room for a second set of experts, the next compiled attach gets the lease
    at once, over fresh replicas started in the old ones' bundles."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # an explicit address needs the local cluster's token
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, ray.get_runtime_context().gcs_address],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "compiled"
        old_ids = {a for ids in serving_ids() for a in ids}
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    wait_for(
        lambda: any(j["DriverPid"] == holder.pid and j["IsDead"] for j in ray._private.state.jobs()),
        "the GCS to see the holder's job end",
        30,
    )
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        ref = model(ids).codec_logits_BLKV
    with attached(model) as (trunk, experts):
        assert experts.exchange_kind == "compiled"
        with torch.no_grad():
            torch.testing.assert_close(trunk(ids).codec_logits_BLKV, ref, rtol=0, atol=1e-5)
        status = expert_status(GROUP)
        assert status.graph_owner == experts.trunk_id and status.trunks == 1
    assert not old_ids & {a for row in status.experts for a in row.actor_ids}


def test_compiled_attach_heals_a_replica_dead_for_good(controller, model):
    """Compiling touches every replica: one that died for good is healed, not raised."""
    dead_id = expert_status(GROUP).experts[0].actor_ids[0]
    for _ in range(CFG.max_restarts + 1):
        os.kill(replica_pid(0), signal.SIGKILL)
        wait_for(lambda: actor_state(dead_id) != "ALIVE", "the GCS to see the replica die", 30)
        wait_for(lambda: actor_state(dead_id) in ("ALIVE", "DEAD"), "the replica's restart or death")
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        ref = model(ids).codec_logits_BLKV
    with attached(model) as (trunk, experts):
        assert experts.exchange_kind == "compiled"
        with torch.no_grad():
            torch.testing.assert_close(trunk(ids).codec_logits_BLKV, ref, rtol=0, atol=1e-5)
    assert expert_status(GROUP).graph_owner is None  # left cleanly
