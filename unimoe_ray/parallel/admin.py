"""The admin API over a running cluster (what `unimoe-ray experts ...` calls): find a group's
controller by name, read its status, scale an expert, shut a group down."""

from __future__ import annotations

import ray
from ray.actor import ActorHandle

from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.status import ExpertStatus


def get_controller(group: str = "default", namespace: str = "unimoe") -> ActorHandle:
    """The named controller of an expert group on the connected cluster."""
    name = ExpertParallelConfig(group=group, namespace=namespace).controller_name
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise LookupError(
            f"no expert group {group!r} in namespace {namespace!r} on this cluster: launch one "
            "with unimoe_ray.parallel.launch_experts(...)"
        ) from None


def expert_status(group: str = "default", namespace: str = "unimoe") -> ExpertStatus:
    return ray.get(get_controller(group, namespace).status.remote())


def scale_expert(expert: int, replicas: int, group: str = "default", namespace: str = "unimoe") -> ExpertStatus:
    """Set an expert's replica count while the model serves; returns the new status once the
    new replicas answer. Trunks switch at their next step boundary."""
    controller = get_controller(group, namespace)
    ray.get(controller.scale.remote(expert, replicas))
    return ray.get(controller.status.remote())


def shutdown_experts(group: str = "default", namespace: str = "unimoe") -> None:
    """Kill a group's replicas and its controller."""
    controller = get_controller(group, namespace)
    ray.get(controller.shutdown.remote())
    ray.kill(controller)
