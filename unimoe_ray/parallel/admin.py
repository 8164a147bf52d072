"""The admin API over a running cluster (what `unimoe-ray experts ...` calls): find a group's
controller by name, read its status, scale an expert, shut a group down.

Every failure reaches the caller as one exception with a one-line message naming the cause:
LookupError (no such group), ValueError (a bad request, as the controller raised it),
ExpertUnavailableError (the cluster cannot place what was asked), ControllerUnavailableError
(the controller is restarting or silent: retry).
"""

from __future__ import annotations

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.status import ExpertStatus

# How long an admin call waits for the controller by default (scale waits for new replicas
# to load their weights, so it gets the group's restart timeout instead).
ADMIN_TIMEOUT_S = 15.0


class ControllerUnavailableError(RuntimeError):
    """The group's controller did not answer: it is restarting (its process died and Ray
    brings it back, re-adopting the running experts) or overloaded. Retrying is safe."""


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


def _actor_state(actor: ActorHandle) -> str:
    """ALIVE, RESTARTING, DEAD, ... as the GCS has it (no dashboard needed)."""
    return ray._private.state.actors(actor_id=actor._actor_id.hex()).get("State", "UNKNOWN")


def call_controller(group: str, namespace: str, method: str, *args, timeout_s: float | None = ADMIN_TIMEOUT_S):
    """`controller.<method>(*args)`, its failures turned into the one-line errors above."""
    controller = get_controller(group, namespace)
    restarting = ControllerUnavailableError(
        f"the controller of expert group {group!r} is restarting (its process died; Ray restarts "
        "it and it re-adopts the running experts, which keep serving): retry in a few seconds"
    )
    if _actor_state(controller) not in ("ALIVE", "DEAD"):
        raise restarting
    try:
        return ray.get(getattr(controller, method).remote(*args), timeout=timeout_s)
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, Exception) else None
        if cause is None:
            raise RuntimeError(f"expert group {group!r}: {method} failed: {err}") from None
        raise cause from None
    except RayActorError:
        raise restarting from None
    except GetTimeoutError:
        if _actor_state(controller) not in ("ALIVE", "DEAD"):
            raise restarting from None
        raise ControllerUnavailableError(
            f"the controller of expert group {group!r} did not answer {method} within {timeout_s:g}s "
            "(busy or restarting): retry, or pass a longer --timeout"
        ) from None


def expert_status(
    group: str = "default", namespace: str = "unimoe", *, timeout_s: float = ADMIN_TIMEOUT_S
) -> ExpertStatus:
    return call_controller(group, namespace, "status", timeout_s=timeout_s)


def scale_expert(
    expert: int, replicas: int, group: str = "default", namespace: str = "unimoe", *, timeout_s: float | None = None
) -> ExpertStatus:
    """Set an expert's replica count while the model serves; returns the new status once the
    new replicas answer. Trunks switch at their next step boundary. A scale the cluster cannot
    place fails at once (ExpertUnavailableError naming the missing resources)."""
    call_controller(group, namespace, "scale", expert, replicas, timeout_s=timeout_s)
    return expert_status(group, namespace)


def shutdown_experts(group: str = "default", namespace: str = "unimoe") -> None:
    """Kill a group's replicas and its controller."""
    controller = get_controller(group, namespace)
    ray.get(controller.shutdown.remote())
    ray.kill(controller, no_restart=True)
