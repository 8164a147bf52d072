"""What an expert group must keep when its controller's process dies: the durable half.

- `GroupState` in Ray's internal KV (held by the GCS, not by any worker): replica names,
  placement groups, topology version, compiled-graph lease, trunks, retiring replicas and the
  model fingerprint. The controller writes it on every change and reads it back when Ray
  restarts it.
- `WeightKeeper`: a detached actor that owns the experts' weight objects when a group is
  launched from an in-memory model. An object dies with its owner, and a replica restart
  re-reads its weights from one, so neither the launching driver nor the controller may own
  them. (A group launched from a checkpoint folder needs no keeper.)
- Replica actors and their placement groups are detached and named (`replica_name`), so they
  outlive the controller and a restarted controller finds them by name.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import ray
from ray.experimental import internal_kv

from unimoe_ray.parallel.fingerprint import ExpertShape, ModelFingerprint


@dataclass(frozen=True)
class ReplicaRecord:
    """One replica as the store keeps it. pg: its placement group's name (None: it asks for no
    resources, so nothing is reserved)."""

    name: str
    actor_id: str
    node: str  # node IP (what an admin recognises), for `status`
    shape: ExpertShape
    digest: str  # of the weights it loaded (fingerprint.state_digest)
    pg: str | None


@dataclass(frozen=True)
class TrunkRecord:
    """A trunk of the group. actor_id / job_id: how to tell it has died (the trunk's actor, or
    the job of the driver it runs in)."""

    acked: int
    actor_id: str | None
    job_id: str | None


@dataclass
class GroupState:
    version: int
    replicas: tuple[tuple[ReplicaRecord, ...], ...]
    fingerprint: ModelFingerprint | None
    graph_owner: str | None = None
    trunks: dict[str, TrunkRecord] = field(default_factory=dict)
    retiring: list[tuple[int, float, ReplicaRecord]] = field(default_factory=list)  # (version, wall deadline, replica)


def _key(group: str) -> str:
    return f"unimoe_experts:{group}"


def save_state(group: str, namespace: str, state: GroupState) -> None:
    internal_kv._internal_kv_put(_key(group), pickle.dumps(state), overwrite=True, namespace=namespace)


def load_state(group: str, namespace: str) -> GroupState | None:
    raw = internal_kv._internal_kv_get(_key(group), namespace=namespace)
    return None if raw is None else pickle.loads(raw)


def delete_state(group: str, namespace: str) -> None:
    internal_kv._internal_kv_del(_key(group), namespace=namespace)


def keeper_name(group: str) -> str:
    return f"unimoe_experts:{group}:weights"


class WeightKeeper:
    """Owns one object per routed expert (re-put here, so this actor owns them). refs: nested in
    a list so Ray hands them over unresolved."""

    def __init__(self, refs: list[ray.ObjectRef]) -> None:
        self._refs = [ray.put(ray.get(ref)) for ref in refs]

    def refs(self) -> list[ray.ObjectRef]:
        return self._refs
