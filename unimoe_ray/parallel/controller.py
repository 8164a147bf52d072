"""The expert controller: a named, detached actor per expert group that owns the routed-expert
replica actors and their weights, publishes the topology, scales, heals, and collects routing
statistics. Admin tools and trunks find it by name.

Scaling protocol (no restart, no lost request):
1. `scale` starts new replicas and waits until they answer, or takes replicas out of the
   topology (they keep running, marked retiring), then bumps the topology version.
2. Each trunk polls `version` at step boundaries; on a change it fetches the topology, rebuilds
   its exchange (tears down and recompiles its graph), and `ack`s the version. An in-flight step
   finishes on the old topology, whose replicas are all still alive.
3. A retiring replica is killed once every live trunk has acked a version without it, or after
   `trunk_timeout_s` (a trunk silent that long is presumed gone; should it return, its exchange
   fails and the fault path moves it to the current topology).

Fault protocol: a trunk whose exchange fails calls `heal`, which probes every replica. A killed
replica with restarts left comes back by itself (Ray re-runs its constructor, which reloads the
weights from the controller-owned object or the checkpoint folder) and answers the probe; one
that does not answer within `restart_timeout_s` is dropped; an expert left with no replica gets a
fresh one. So every expert always has a live replica or `heal` raises: output never silently
misses an expert.

Compiled-graph lease: an actor takes part in one compiled graph at a time, so one trunk per group
(the lease holder, `Topology.graph_owner`) drives a graph; the others use plain calls. A holder
that dies without tearing its graph down leaves every replica's graph loop waiting on it, and a
new graph over those actors would hang; so when the lease passes from a vanished holder, and
when the holder's exchange times out, the replicas are replaced by fresh ones.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.expert_actor import ExpertWorker
from unimoe_ray.parallel.fingerprint import ExpertShape, ModelFingerprint
from unimoe_ray.parallel.resources import actor_options
from unimoe_ray.parallel.routing_stats import RoutingSample, RoutingWindow
from unimoe_ray.parallel.status import ExpertRow, ExpertStatus
from unimoe_ray.parallel.topology import Topology

log = logging.getLogger(__name__)

ExpertActor = ray.remote(ExpertWorker)

# Pause before probing again an actor that is in the middle of restarting.
PROBE_RETRY_S = 0.2
# How long a lease holder's actor may take to answer before it counts as alive but busy.
OWNER_PROBE_S = 1.0


class ExpertUnavailableError(RuntimeError):
    """An expert has no working replica and none could be started."""


@dataclass(frozen=True)
class Replica:
    handle: ActorHandle
    actor_id: str
    node: str  # node IP (what an admin recognises), for `status`
    shape: ExpertShape
    digest: str  # of the weights it loaded (fingerprint.state_digest)


@dataclass
class _Trunk:
    acked: int  # newest topology version the trunk runs on
    last_seen: float
    actor: ActorHandle | None  # the trunk's actor, if it runs in one (liveness check)


class ExpertController:
    """Registry and owner of one group's expert replicas (run as a threaded actor).

    weights: a checkpoint folder every node can read, or one object ref per expert (refs nested
    in a list so Ray hands them over unresolved); the controller re-puts those objects so it owns
    them: they then outlive the launching driver and feed replica restarts.
    routers: `fingerprint.router_digest` of the model the weights come from; with the digests
    the first replicas report it makes the group's fingerprint, which attach checks.
    """

    def __init__(
        self, cfg: ExpertParallelConfig, *, num_routed: int, num_layers: int,
        weights: str | list[ray.ObjectRef], routers: str,
    ) -> None:
        self.cfg = cfg
        if isinstance(weights, str):
            self._sources: list = [weights] * num_routed
        else:
            if len(weights) != num_routed:
                raise ValueError(f"{len(weights)} expert weight refs for num_routed={num_routed}")
            self._sources = [ray.put(ray.get(ref)) for ref in weights]
        self._lock = threading.RLock()  # held by scale/heal while they wait on actors
        self._stats_lock = threading.Lock()
        self._routing = RoutingWindow(num_routed=num_routed, num_layers=num_layers, window_s=cfg.stats_window_s)
        self._trunks: dict[str, _Trunk] = {}
        self._graph_owner: str | None = None
        self._retiring: list[tuple[int, float, ActorHandle]] = []  # (version, deadline, actor)
        self._version = 0
        self._replicas: tuple[tuple[Replica, ...], ...] = ()
        self._fingerprint: ModelFingerprint | None = None
        started = iter(self._start([e for e in range(num_routed) for _ in range(cfg.initial_replicas)]))
        self._publish(tuple(tuple(next(started) for _ in range(cfg.initial_replicas)) for _ in range(num_routed)))
        first = [group[0] for group in self._replicas]
        if len({r.shape for r in first}) != 1:
            self.shutdown()
            raise ValueError(f"the experts' weights differ in shape: {[r.shape for r in first]}")
        self._fingerprint = ModelFingerprint(
            shape=first[0].shape, num_routed=num_routed, routers=routers, experts=tuple(r.digest for r in first),
        )

    # ---- replicas ----

    def _start(self, experts: list[int]) -> list[Replica]:
        """One new replica per entry of `experts` (all started at once); returns once they
        answer, or raises (killing them) if they do not within `restart_timeout_s`."""
        opts = actor_options(self.cfg.expert_resources, max_restarts=self.cfg.max_restarts)
        res = self.cfg.expert_resources
        handles = [
            ExpertActor.options(**opts).remote(
                expert_idx=e, state=self._sources[e], device=res.device, threads=res.torch_threads,
            )
            for e in experts
        ]
        replicas = self._probe(handles)
        fp = self._fingerprint
        if fp is not None and any(r and r.digest != fp.experts[e] for e, r in zip(experts, replicas)):
            for h in handles:
                ray.kill(h, no_restart=True)
            raise ExpertUnavailableError(
                f"experts {sorted(set(experts))}: a new replica loaded other weights than the group "
                "launched with (was the checkpoint folder changed?); relaunch the group"
            )
        if any(r is None for r in replicas):
            for h in handles:
                ray.kill(h, no_restart=True)
            raise ExpertUnavailableError(
                f"experts {sorted(set(experts))}: new replicas did not start within "
                f"{self.cfg.restart_timeout_s:g}s; is there a node offering {opts}? (add expert "
                "nodes or lower the request)"
            )
        return replicas

    def _replace_all(self) -> tuple[tuple[Replica, ...], ...]:
        """Fresh replicas for every current one (same counts); the old ones are killed."""
        fresh = iter(self._start([e for e, group in enumerate(self._replicas) for _ in group]))
        for group in self._replicas:
            for r in group:
                ray.kill(r.handle, no_restart=True)
        return tuple(tuple(next(fresh) for _ in group) for group in self._replicas)

    def _probe(self, handles: list[ActorHandle]) -> list[Replica | None]:
        """Each actor's Replica record, or None if it is dead for good or silent past the
        restart timeout. A restarting actor answers once its constructor has reloaded the
        weights; a probe caught by the restart itself (ActorUnavailableError) is sent again."""
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        out: list[Replica | None] = [None] * len(handles)
        todo = list(range(len(handles)))
        while todo and time.monotonic() < deadline:
            refs = {i: handles[i].info.remote() for i in todo}
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0))
            todo = []
            for i, ref in refs.items():
                try:
                    info = ray.get(ref, timeout=0)
                    out[i] = Replica(
                        handle=handles[i], actor_id=info["actor_id"], node=info["node_ip"],
                        shape=info["shape"], digest=info["digest"],
                    )
                except ActorUnavailableError:
                    todo.append(i)
                except (RayActorError, GetTimeoutError):
                    pass  # dead for good, or still silent at the deadline
            if todo:
                time.sleep(PROBE_RETRY_S)
        return out

    def _publish(self, replicas: tuple[tuple[Replica, ...], ...]) -> None:
        self._replicas = replicas
        self._version += 1

    def _topology(self) -> Topology:
        return Topology(
            version=self._version,
            replicas=tuple(tuple(r.handle for r in group) for group in self._replicas),
            graph_owner=self._graph_owner,
        )

    def _live(self, trunk: _Trunk, now: float) -> bool:
        return now - trunk.last_seen < self.cfg.trunk_timeout_s

    def _reap(self) -> None:
        """Kill retiring replicas no live trunk can still be using."""
        now = time.monotonic()
        oldest_ack = min((t.acked for t in self._trunks.values() if self._live(t, now)), default=self._version)
        keep = []
        for version, deadline, handle in self._retiring:
            if version <= oldest_ack or now >= deadline:
                ray.kill(handle, no_restart=True)
            else:
                keep.append((version, deadline, handle))
        self._retiring = keep

    def _holder_alive(self, now: float) -> bool:
        """Whether the lease holder is still there: its actor answers (or is busy), or, for a
        trunk in a driver process, it polled within `trunk_timeout_s`."""
        holder = self._trunks.get(self._graph_owner)
        if holder is None:
            return False
        if holder.actor is None:
            return self._live(holder, now)
        try:
            ray.get(holder.actor.__ray_ready__.remote(), timeout=OWNER_PROBE_S)
        except RayActorError:
            return False
        except GetTimeoutError:
            pass  # busy decoding
        return True

    # ---- trunks ----

    def register_trunk(self, trunk_id: str, want_graph: bool, actor: ActorHandle | None = None) -> Topology:
        """A trunk joins the group; it gets the compiled-graph lease if it wants it and the
        lease is free (or its holder is gone; see the module docstring)."""
        with self._lock:
            now = time.monotonic()
            self._trunks[trunk_id] = _Trunk(acked=0, last_seen=now, actor=actor)
            if want_graph and (self._graph_owner is None or not self._holder_alive(now)):
                replicas = self._replicas
                if self._graph_owner is not None:
                    log.warning("lease holder %s vanished without teardown: replacing replicas", self._graph_owner)
                    self._trunks.pop(self._graph_owner, None)
                    replicas = self._replace_all()
                self._graph_owner = trunk_id
                self._publish(replicas)  # a new version tells every trunk who holds the lease
            return self._topology()

    def unregister_trunk(self, trunk_id: str) -> None:
        with self._lock:
            self._trunks.pop(trunk_id, None)
            if self._graph_owner == trunk_id:
                self._graph_owner = None
            self._reap()

    def version(self, trunk_id: str | None = None) -> int:
        """The current topology version; a trunk's poll also marks it alive, and retires
        replicas whose deadline passed (unless a scale or heal holds the lock: never wait here)."""
        trunk = self._trunks.get(trunk_id) if trunk_id else None
        if trunk is not None:
            trunk.last_seen = time.monotonic()
        if self._retiring and self._lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self._lock.release()
        return self._version

    def topology(self) -> Topology:
        return self._topology()

    def fingerprint(self) -> ModelFingerprint:
        """What the group serves (recorded at launch): attach checks a model against it."""
        return self._fingerprint

    def ack(self, trunk_id: str, version: int) -> None:
        """The trunk now runs on `version`: replicas retired before it may go."""
        with self._lock:
            trunk = self._trunks.get(trunk_id)
            if trunk is None:
                return  # the trunk left already (calls to a threaded actor may overtake each other)
            trunk.acked = max(trunk.acked, version)
            trunk.last_seen = time.monotonic()
            self._reap()

    # ---- admin ----

    def scale(self, expert: int, replicas: int) -> Topology:
        """Set expert `expert`'s replica count; returns once new replicas answer."""
        if not 0 <= expert < len(self._replicas):
            raise ValueError(f"expert {expert} does not exist: routed experts are 0..{len(self._replicas) - 1}")
        if replicas < 1:
            raise ValueError(f"replicas={replicas}: every expert needs at least 1 replica")
        with self._lock:
            group = self._replicas[expert]
            if replicas == len(group):
                return self._topology()
            retired: tuple[Replica, ...] = ()
            if replicas > len(group):
                group = group + tuple(self._start([expert] * (replicas - len(group))))
            else:
                group, retired = group[:replicas], group[replicas:]
            self._publish(self._replicas[:expert] + (group,) + self._replicas[expert + 1:])
            deadline = time.monotonic() + self.cfg.trunk_timeout_s
            self._retiring += [(self._version, deadline, r.handle) for r in retired]
            self._reap()
            log.info("expert %d now has %d replicas (topology v%d)", expert, replicas, self._version)
            return self._topology()

    def heal(self, trunk_id: str | None = None, reset: bool = False) -> Topology:
        """After a failed exchange: keep replicas that answer (restarted ones included), drop
        the rest, replace an expert's last replica if it is gone. `reset` (the lease holder's
        graph timed out: its loops may be wedged though every actor answers) replaces all
        replicas. Always bumps the version."""
        with self._lock:
            flat = [r for group in self._replicas for r in group]
            probed = iter(self._probe([r.handle for r in flat]))
            healed = []
            for e, group in enumerate(self._replicas):
                alive = []
                for old in group:
                    new = next(probed)
                    if new is None:
                        log.warning("expert %d: replica %s is gone; dropping it", e, old.actor_id)
                        ray.kill(old.handle, no_restart=True)
                    else:
                        alive.append(new)
                healed.append(tuple(alive) or tuple(self._start([e])))
            self._replicas = tuple(healed)
            if reset and trunk_id is not None and trunk_id == self._graph_owner:
                log.warning("compiled exchange of %s timed out: replacing all replicas", trunk_id)
                self._replicas = self._replace_all()
            self._publish(self._replicas)
            return self._topology()

    def report_routing(self, sample: RoutingSample) -> None:
        with self._stats_lock:
            self._routing.add(sample)

    def status(self) -> ExpertStatus:
        with self._stats_lock:
            totals = self._routing.totals()
        now = time.monotonic()
        replicas, version = self._replicas, self._version
        rows = tuple(
            ExpertRow(
                expert=e, replicas=len(group), nodes=tuple(r.node for r in group),
                actor_ids=tuple(r.actor_id for r in group), tokens=totals.tokens_E[e],
            )
            for e, group in enumerate(replicas)
        )
        return ExpertStatus(
            group=self.cfg.group, version=version, window_s=totals.window_s, experts=rows,
            experts_per_token_L=totals.experts_per_token_L,
            routed_per_token_L=totals.routed_per_token_L,
            trunks=sum(self._live(t, now) for t in self._trunks.values()),
            graph_owner=self._graph_owner,
        )

    def shutdown(self) -> None:
        """Kill every replica (the caller then kills this actor)."""
        with self._lock:
            for group in self._replicas:
                for r in group:
                    ray.kill(r.handle, no_restart=True)
            for _, _, handle in self._retiring:
                ray.kill(handle, no_restart=True)
            self._replicas, self._retiring = (), []
