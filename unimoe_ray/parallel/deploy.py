"""Launching an expert group and attaching a trunk model to it.

    controller = launch_experts(model_or_checkpoint, cfg)   # once per cluster (detached)
    experts = attach_experts(trunk_model, cfg)              # in the process that runs the model
    ... model(...) / generate(model, ...) as usual ...
    experts.close()

`attach_experts` also adds two hooks: a forward pre-hook on the model, so every forward (one
decode step) starts with `RayExperts.sync()` (a step boundary: topology changes apply only
there, never inside a step), and a forward hook on each DCMoE that counts routing for `status`.
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.actor import ActorHandle

from unimoe_ray.config_hf import load_config
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel.admin import get_controller
from unimoe_ray.parallel.backend import RayExperts
from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.controller import ExpertController, ExpertUnavailableError
from unimoe_ray.parallel.fingerprint import checkpoint_router_digest, model_fingerprint, router_digest
from unimoe_ray.parallel.store import WeightKeeper, delete_state, keeper_name
from unimoe_ray.parallel.weights import dcmoe_layers, expert_state, strip_routed_experts

# Threads: admin calls (status, scale) must be answered while a heal waits on restarting actors.
CONTROLLER_CONCURRENCY = 16


def launch_experts(weights: UniMoEAudio | str | Path, cfg: ExpertParallelConfig) -> ActorHandle:
    """Start the group's controller (named, detached, restarted by Ray when its process dies)
    and `cfg.initial_replicas` replicas of every routed expert; returns once all replicas answer.

    weights: an in-memory model (its experts' weights go through the object store, owned by the
    group's WeightKeeper actor) or a checkpoint folder readable on every expert node (each
    replica reads only its expert).
    """
    try:
        get_controller(cfg.group, cfg.namespace)
    except LookupError:
        pass
    else:
        raise ValueError(
            f"expert group {cfg.group!r} already runs in namespace {cfg.namespace!r}: scale it, or "
            "shut it down first (shutdown_experts)"
        )
    delete_state(cfg.group, cfg.namespace)  # left by a group whose controller was killed outright
    if isinstance(weights, UniMoEAudio):
        model_cfg = weights.cfg
        refs = [ray.put(expert_state(weights, e)) for e in range(model_cfg.moe.num_routed)]
        keeper = (
            ray.remote(WeightKeeper)
            .options(name=keeper_name(cfg.group), namespace=cfg.namespace, lifetime="detached", num_cpus=0)
            .remote(refs)
        )
        ray.get(keeper.refs.remote())  # the keeper owns the weights now
        source, routers = None, router_digest(weights)
    else:
        model_cfg = load_config(weights)
        source, routers = str(weights), checkpoint_router_digest(weights)
    controller = (
        ray.remote(ExpertController)
        .options(
            name=cfg.controller_name,
            namespace=cfg.namespace,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=CONTROLLER_CONCURRENCY,
            max_restarts=-1,
        )
        .remote(
            cfg, num_routed=model_cfg.moe.num_routed, num_layers=model_cfg.num_layers, source=source, routers=routers
        )
    )
    try:
        ray.get(controller.version.remote())  # the constructor has started every replica
    except ray.exceptions.RayActorError as err:
        for name in (cfg.controller_name, keeper_name(cfg.group)):
            try:
                ray.kill(ray.get_actor(name, namespace=cfg.namespace))
            except ValueError:
                pass
        raise ExpertUnavailableError(f"expert group {cfg.group!r} did not start: {err}") from None
    return controller


def attach_experts(model: UniMoEAudio, cfg: ExpertParallelConfig) -> RayExperts:
    """Run `model`'s routed experts on the group's actors, from this process on.

    The model is first checked against the group's fingerprint (expert shapes and layers,
    router weights, and each routed expert's weights unless the model's were stripped): a
    mismatch raises ValueError naming the difference, with the model untouched. Then its own
    routed-expert weights are freed (moved to the meta device). Returns the backend (topology,
    exchange kind, recoveries; `close()` detaches from the group).
    """
    layers = dcmoe_layers(model)
    controller = get_controller(cfg.group, cfg.namespace)
    why = model_fingerprint(model).mismatch(ray.get(controller.fingerprint.remote()))
    if why is not None:
        raise ValueError(
            f"the model does not match expert group {cfg.group!r}: {why}. Attach the model the group "
            "was launched with, or launch a group for this model (launch_experts with another group name)"
        )
    experts = RayExperts(controller, cfg, num_routed=model.cfg.moe.num_routed, num_layers=model.cfg.num_layers)
    strip_routed_experts(model)

    def count_routing(moe, args, output) -> None:
        stats = output[1]
        experts.stats.add(moe.layer_idx, stats.k_T, stats.counts)

    for moe in layers:
        moe.expert_backend = experts
        experts.hooks.append(moe.register_forward_hook(count_routing))
    experts.hooks.append(model.register_forward_pre_hook(lambda module, args: experts.sync()))
    return experts
