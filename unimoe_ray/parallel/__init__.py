"""Expert parallelism on Ray: routed experts as actors (one per expert index and replica), a
trunk that exchanges tokens with them over a Ray Compiled Graph (or plain calls), a named
controller per expert group for scaling, healing and routing statistics.

Files, one concern each: resources (placement), config, weights (trunk/expert split),
fingerprint (what a group serves, checked at attach), wire (payload format), expert_actor,
topology (replica split), exchange (transports), backend (the ExpertBackend), routing_stats,
status, store (the group state that outlives the controller), controller, admin (operator API),
deploy (launch/attach), trunk (the trunk actor).
"""

from unimoe_ray.parallel.admin import (
    ControllerUnavailableError,
    expert_status,
    get_controller,
    scale_expert,
    shutdown_experts,
)
from unimoe_ray.parallel.backend import RayExperts
from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.controller import ExpertUnavailableError
from unimoe_ray.parallel.deploy import attach_experts, launch_experts
from unimoe_ray.parallel.resources import ActorResources
from unimoe_ray.parallel.trunk import TrunkWorker, start_trunk

__all__ = [
    "ActorResources",
    "ControllerUnavailableError",
    "ExpertParallelConfig",
    "ExpertUnavailableError",
    "RayExperts",
    "TrunkWorker",
    "attach_experts",
    "expert_status",
    "get_controller",
    "launch_experts",
    "scale_expert",
    "shutdown_experts",
    "start_trunk",
]
