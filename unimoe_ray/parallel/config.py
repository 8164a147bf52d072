"""Expert-parallel settings: one frozen dataclass, built from CLI/YAML at the edges only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unimoe_ray.parallel.resources import EXPERT_NODE_RESOURCE, TRUNK_NODE_RESOURCE, ActorResources
from unimoe_ray.parallel.wire import INBAND_MAX_BYTES

Exchange = Literal["compiled", "plain"]


@dataclass(frozen=True, kw_only=True)
class ExpertParallelConfig:
    """How routed experts are deployed as Ray actors and how a trunk talks to them.

    group / namespace: the named controller (`unimoe_experts:<group>` in `namespace`) that owns
    one set of expert actors. A Compiled Graph may be driven by one trunk process only, and an
    actor joins one graph at a time, so each group has at most one compiled-graph trunk; more
    trunks on the same group fall back to plain calls (or get a group of their own).
    exchange: "compiled" (Ray Compiled Graph, steady state) or "plain" (actor calls).
    initial_replicas: replicas per expert at launch.
    max_restarts: Ray restarts a killed expert actor this many times (weights reload in its
    constructor); after that the replica is dropped and, if it was the last, replaced.
    exchange_retries: how often one token exchange is retried after a fault before raising.
    exchange_timeout_s: the longest one exchange may take (expert compute included).
    restart_timeout_s: how long recovery waits for a restarting replica before dropping it (and
    how long a trunk waits for a restarting controller to heal).
    placement_timeout_s: how long a scale-up waits for the cluster to reserve its new replicas'
    resources before failing with what is missing (repair never waits on this: a replica's
    replacement reuses its reserved bundle; launch waits `restart_timeout_s`). Raise it on an
    autoscaling cluster, where new nodes take minutes.
    topology_poll_s: how often a trunk checks for a new topology (at step boundaries).
    stats_interval_s / stats_window_s: routing-statistics push interval / `status` window.
    graph_idle_s: a compiled graph unused this long is torn down (its channel readers
    busy-wait, a core per replica) and recompiled at the next exchange; each recompile leaks
    the graph's channel buffers in Ray 2.60, so keep it long.
    inband_max_bytes: a replica's share of one exchange up to this size travels as one raw
    `bytes` message (no serializer cost: every decode step), larger as a zero-copy numpy view
    (prefill); see unimoe_ray.parallel.wire. 0 sends everything in the numpy form.
    trunk_timeout_s: a trunk that has not polled for this long is presumed gone: replicas
    scaled down are then killed without its acknowledgement, and (for a trunk outside an actor,
    whose liveness Ray cannot tell) its compiled-graph lease lapses.
    """

    group: str = "default"
    namespace: str = "unimoe"
    exchange: Exchange = "compiled"
    initial_replicas: int = 1
    expert_resources: ActorResources = field(default_factory=lambda: ActorResources(node_resource=EXPERT_NODE_RESOURCE))
    trunk_resources: ActorResources = field(default_factory=lambda: ActorResources(node_resource=TRUNK_NODE_RESOURCE))
    max_restarts: int = 3
    exchange_retries: int = 3
    exchange_timeout_s: float = 300.0
    restart_timeout_s: float = 120.0
    placement_timeout_s: float = 10.0
    topology_poll_s: float = 0.5
    stats_interval_s: float = 1.0
    stats_window_s: float = 60.0
    graph_idle_s: float = 300.0
    trunk_timeout_s: float = 60.0
    inband_max_bytes: int = INBAND_MAX_BYTES

    def __post_init__(self) -> None:
        if self.exchange not in ("compiled", "plain"):
            raise ValueError(f"exchange={self.exchange!r}: use 'compiled' or 'plain'")
        if self.initial_replicas < 1:
            raise ValueError("initial_replicas must be >= 1: every expert needs a replica")
        if self.max_restarts < 0 or self.exchange_retries < 0 or self.inband_max_bytes < 0:
            raise ValueError("max_restarts, exchange_retries and inband_max_bytes must be >= 0")
        if (
            min(
                self.exchange_timeout_s,
                self.restart_timeout_s,
                self.placement_timeout_s,
                self.stats_window_s,
                self.graph_idle_s,
                self.trunk_timeout_s,
            )
            <= 0
        ):
            raise ValueError(
                "exchange_timeout_s, restart_timeout_s, placement_timeout_s, stats_window_s, graph_idle_s, "
                "trunk_timeout_s must be > 0"
            )

    @property
    def controller_name(self) -> str:
        return f"unimoe_experts:{self.group}"
