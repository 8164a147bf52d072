"""Where expert-parallel actors run: the resource names the code requests, and the one function
that turns a resource config into Ray actor options.

The same code places experts on CPU nodes, GPUs or Ascend NPUs; only the config differs:

    ActorResources(num_cpus=4)                    # CPU experts
    ActorResources(num_cpus=1, num_gpus=1)        # one GPU per expert replica
    ActorResources(num_cpus=1, npus=1)            # one Ascend NPU (Ray's "NPU" resource)

`node_resource` is a custom resource that only the intended node group advertises
(cluster/*.yaml give expert nodes `expert_node` and trunk nodes `trunk_node`), so expert actors
land on expert nodes and trunk actors on trunk nodes. tests/unit/test_cluster_files.py checks
that the cluster files advertise exactly these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# Ray's built-in accelerator resource for Huawei Ascend; Ray sets ASCEND_RT_VISIBLE_DEVICES.
NPU_RESOURCE = "NPU"
# Custom node-group resources advertised by the cluster files.
EXPERT_NODE_RESOURCE = "expert_node"
TRUNK_NODE_RESOURCE = "trunk_node"

Device = Literal["cpu", "cuda", "npu"]


@dataclass(frozen=True, kw_only=True)
class ActorResources:
    """What one actor asks Ray for.

    node_resource: custom resource pinning the actor to a node group (None: any node);
    node_resource_amount: how much of it each actor takes, so a node advertising
    `expert_node: 8` hosts at most 8 expert replicas.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    npus: float = 0.0
    node_resource: str | None = None
    node_resource_amount: float = 1.0

    def __post_init__(self) -> None:
        if min(self.num_cpus, self.num_gpus, self.npus) < 0:
            raise ValueError("num_cpus, num_gpus and npus must be >= 0")
        if self.num_gpus and self.npus:
            raise ValueError("an actor uses GPUs or NPUs, not both: set one of num_gpus / npus")
        if self.node_resource is not None and self.node_resource_amount <= 0:
            raise ValueError("node_resource_amount must be > 0 when node_resource is set")

    @property
    def device(self) -> Device:
        """The torch device type the actor computes on."""
        if self.num_gpus:
            return "cuda"
        if self.npus:
            return "npu"
        return "cpu"

    @property
    def torch_threads(self) -> int:
        """Intra-op threads: the CPUs Ray reserved (at least 1), so co-located actors do not
        oversubscribe cores."""
        return max(1, int(self.num_cpus))


def actor_options(res: ActorResources, **extra: Any) -> dict[str, Any]:
    """Ray `.options(...)` for an actor with these resources; `extra` adds name, namespace,
    lifetime, max_restarts, ..."""
    custom: dict[str, float] = {}
    if res.npus:
        custom[NPU_RESOURCE] = res.npus
    if res.node_resource is not None:
        custom[res.node_resource] = res.node_resource_amount
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if custom:
        opts["resources"] = custom
    opts.update(extra)
    return opts


def load_device_backend(device: Device) -> None:
    """Make `device` usable in this process: Ascend's torch backend is an optional extra
    (torch_npu), imported only on NPU actors, never where torch runs on CPU or CUDA."""
    if device == "npu":
        import torch_npu  # noqa: F401
