"""The expert controller: a named, detached actor per expert group that starts the routed-expert
replica actors, publishes the topology, scales, heals, and collects routing statistics. Admin
tools and trunks find it by name.

Surviving its own death: the controller is not on the data path (a trunk exchanges tokens with
the replicas directly and only polls the controller at step boundaries, without waiting), and
it owns nothing that dies with it: replicas and their placement groups are detached and named,
weights are owned by a keeper actor (or read from a checkpoint folder), and the group's state
lives in Ray's internal KV (see store.py). Ray restarts a killed controller
(`max_restarts=-1`); the new one reads the state back and re-adopts the running replicas, while
decoding goes on. Admin calls made meanwhile get ControllerUnavailableError (admin.py).

Placement: each replica that asks for resources gets its own one-bundle placement group. A
replica restarted by Ray (`max_restarts`) comes back in its own bundle, and a dead one's
replacement reuses it, so repair never competes with a scale-up for freed resources. A scale-up
first reserves new bundles and fails within `placement_timeout_s` when the cluster cannot
place them, naming what is missing; it holds no lock that heal or attach need while it waits.

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
weights) and answers the probe; one that does not answer within `restart_timeout_s` is dropped
(its bundle released); an expert left with no replica gets a fresh one in the dead one's
bundle. So every expert always has a live replica or `heal` raises: output never silently
misses an expert.

Compiled-graph lease: an actor takes part in one compiled graph at a time, so one trunk per group
(the lease holder, `Topology.graph_owner`) drives a graph; the others use plain calls. A holder
that dies without tearing its graph down leaves every replica's graph loop waiting on it, and a
new graph over those actors would hang; so when the lease passes from a dead holder (its actor
or driver job is dead, as the GCS knows at once), and when the holder's exchange times out,
the replicas are replaced: all old ones killed first, the new ones started in their bundles, so
a full cluster needs no room for a second set.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.expert_actor import ExpertWorker
from unimoe_ray.parallel.fingerprint import ModelFingerprint
from unimoe_ray.parallel.resources import actor_options
from unimoe_ray.parallel.routing_stats import RoutingSample, RoutingWindow
from unimoe_ray.parallel.status import ExpertRow, ExpertStatus
from unimoe_ray.parallel.store import (
    GroupState,
    ReplicaRecord,
    TrunkRecord,
    delete_state,
    keeper_name,
    load_state,
    save_state,
)
from unimoe_ray.parallel.topology import Topology

log = logging.getLogger(__name__)

ExpertActor = ray.remote(ExpertWorker)

# Pause before probing again an actor that is in the middle of restarting.
PROBE_RETRY_S = 0.2


class ExpertUnavailableError(RuntimeError):
    """An expert has no working replica and none could be started, or a scale-up cannot be placed."""


def actor_state(actor_id: str) -> str:
    """ALIVE, RESTARTING, DEAD, ... as the GCS has it."""
    return ray._private.state.actors(actor_id=actor_id).get("State", "DEAD")


def _pg(pg_id: str) -> PlacementGroup:
    from ray._raylet import PlacementGroupID

    return PlacementGroup(PlacementGroupID.from_hex(pg_id))


class ExpertController:
    """Registry of one group's expert replicas (run as a threaded, restartable actor).

    source: a checkpoint folder every node can read, or None: the weights are held by the
    group's WeightKeeper (store.py). routers: `fingerprint.router_digest` of the model; with the
    digests the first replicas report it makes the group's fingerprint, which attach checks.
    A restart (same arguments) finds the group's state in the KV and adopts its replicas.
    """

    def __init__(
        self, cfg: ExpertParallelConfig, *, num_routed: int, num_layers: int, source: str | None, routers: str
    ) -> None:
        self.cfg = cfg
        if source is None:
            keeper = ray.get_actor(keeper_name(cfg.group), namespace=cfg.namespace)
            self._sources: list = ray.get(keeper.refs.remote())
        else:
            self._sources = [source] * num_routed
        self._lock = threading.RLock()  # the registry: held by heal, the publish step of scale, ...
        self._scale_lock = threading.Lock()  # one scale at a time (held while new replicas start)
        self._stats_lock = threading.Lock()
        self._routing = RoutingWindow(num_routed=num_routed, num_layers=num_layers, window_s=cfg.stats_window_s)
        self._handles: dict[str, ActorHandle] = {}
        self._last_seen: dict[str, float] = {}  # trunk id → monotonic time of its last poll
        state = load_state(cfg.group, cfg.namespace)
        if state is not None:
            self._adopt(state)
            return
        self._state = GroupState(version=0, replicas=(), fingerprint=None)
        started = iter(self._start([e for e in range(num_routed) for _ in range(cfg.initial_replicas)]))
        replicas = tuple(tuple(next(started) for _ in range(cfg.initial_replicas)) for _ in range(num_routed))
        first = [group[0] for group in replicas]
        if len({r.shape for r in first}) != 1:
            self._kill([r for group in replicas for r in group])
            raise ValueError(f"the experts' weights differ in shape: {[r.shape for r in first]}")
        self._state.fingerprint = ModelFingerprint(
            shape=first[0].shape, num_routed=num_routed, routers=routers, experts=tuple(r.digest for r in first)
        )
        self._publish(replicas)

    def _adopt(self, state: GroupState) -> None:
        """A restarted controller takes the running replicas over (replicas that died while it
        was down are healed by the next `heal`, as any other dead replica)."""
        self._state = state
        now = time.monotonic()
        for group in state.replicas:
            for r in group:
                try:
                    self._handles[r.name] = ray.get_actor(r.name, namespace=self.cfg.namespace)
                except ValueError:
                    self._handles[r.name] = None  # gone for good: heal replaces it
        for _, _, r in state.retiring:
            try:
                self._handles[r.name] = ray.get_actor(r.name, namespace=self.cfg.namespace)
            except ValueError:
                self._handles[r.name] = None
        self._last_seen = {t: now for t in state.trunks}
        log.warning("controller of group %r restarted: adopted topology v%d", self.cfg.group, state.version)
        if any(h is None for h in self._handles.values()):
            self._state.retiring = [x for x in state.retiring if self._handles[x[2].name] is not None]
            self.heal()  # replicas that died for good while no controller ran

    # ---- replicas ----

    def _bundle(self) -> dict[str, float]:
        opts = actor_options(self.cfg.expert_resources)
        bundle = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"], **opts.get("resources", {})}
        return {k: float(v) for k, v in bundle.items() if v}

    def _reserve(self, expert: int, n: int, timeout_s: float) -> list[str | None]:
        """`n` new one-bundle placement groups for replicas of `expert` (ids), or raises within
        `timeout_s` naming what the cluster lacks."""
        bundle = self._bundle()
        if not bundle:
            return [None] * n  # nothing to reserve
        pgs = [placement_group([bundle], lifetime="detached") for _ in range(n)]
        ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=n, timeout=timeout_s)
        if len(ready) == n:
            return [pg.id.hex() for pg in pgs]
        for pg in pgs:
            remove_placement_group(pg)
        free = ray.available_resources()
        short = {k: v for k, v in bundle.items() if free.get(k, 0.0) < v}
        raise ExpertUnavailableError(
            f"expert {expert}: cannot place {n} more replica(s) within {timeout_s:g}s: each "
            f"needs {bundle}, the cluster has { ({k: free.get(k, 0.0) for k in bundle}) } free"
            f"{f' (short of {sorted(short)})' if short else ''}; add nodes offering them or scale another expert down"
        )

    def _start(
        self, experts: list[int], pgs: list[str | None] | None = None, placement_timeout_s: float | None = None
    ) -> list[ReplicaRecord]:
        """One new replica per entry of `experts`, in the given placement groups (None: a new
        one each, reserved first within `placement_timeout_s`, by default `restart_timeout_s`:
        only a scale-up is meant to give up early); returns once they answer, or raises
        (killing them and releasing the groups it reserved) if they do not within
        `restart_timeout_s`."""
        cfg = self.cfg
        if pgs is None:
            reserved: dict[int, list[str | None]] = {}
            try:
                for e in sorted(set(experts)):
                    reserved[e] = self._reserve(e, experts.count(e), placement_timeout_s or cfg.restart_timeout_s)
            except ExpertUnavailableError:
                self._release([pg for pgs_e in reserved.values() for pg in pgs_e])
                raise
            pgs = fresh_pgs = [reserved[e].pop() for e in experts]
        else:
            fresh_pgs = []
        opts = actor_options(
            cfg.expert_resources, max_restarts=cfg.max_restarts, lifetime="detached", namespace=cfg.namespace
        )
        res = cfg.expert_resources
        names = [f"unimoe_experts:{cfg.group}:e{e}:{uuid.uuid4().hex[:8]}" for e in experts]
        handles = []
        for e, name, pg in zip(experts, names, pgs):
            strategy = {} if pg is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(_pg(pg), 0)}
            handles.append(
                ExpertActor.options(name=name, **opts, **strategy).remote(
                    expert_idx=e, state=self._sources[e], device=res.device, threads=res.torch_threads
                )
            )
        infos = self._probe(handles)
        fp = self._state.fingerprint
        if any(i is None for i in infos) or (fp and any(i["digest"] != fp.experts[e] for e, i in zip(experts, infos))):
            for h in handles:
                ray.kill(h, no_restart=True)
            self._release(fresh_pgs)
            if all(i is not None for i in infos):
                raise ExpertUnavailableError(
                    f"experts {sorted(set(experts))}: a new replica loaded other weights than the group "
                    "launched with (was the checkpoint folder changed?); relaunch the group"
                )
            raise ExpertUnavailableError(
                f"experts {sorted(set(experts))}: new replicas did not start within {cfg.restart_timeout_s:g}s "
                f"(resources per replica: {self._bundle() or 'none'}); see the expert actors' logs"
            )
        out = []
        for name, handle, info, pg in zip(names, handles, infos, pgs):
            self._handles[name] = handle
            out.append(
                ReplicaRecord(
                    name=name,
                    actor_id=info["actor_id"],
                    node=info["node_ip"],
                    shape=info["shape"],
                    digest=info["digest"],
                    pg=pg,
                )
            )
        return out

    def _probe(self, handles: list[ActorHandle | None]) -> list[dict | None]:
        """Each actor's `info`, or None if it is dead for good or silent past the restart
        timeout. A restarting actor answers once its constructor has reloaded the weights; a
        probe caught by the restart itself (ActorUnavailableError) is sent again."""
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        out: list[dict | None] = [None] * len(handles)
        todo = [i for i, h in enumerate(handles) if h is not None]
        while todo and time.monotonic() < deadline:
            refs = {i: handles[i].info.remote() for i in todo}
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0))
            todo = []
            for i, ref in refs.items():
                try:
                    out[i] = ray.get(ref, timeout=0)
                except ActorUnavailableError:
                    todo.append(i)
                except (RayActorError, GetTimeoutError):
                    pass  # dead for good, or still silent at the deadline
            if todo:
                time.sleep(PROBE_RETRY_S)
        return out

    def _kill(self, replicas: list[ReplicaRecord], release: bool = True) -> None:
        for r in replicas:
            handle = self._handles.pop(r.name, None)
            if handle is not None:
                ray.kill(handle, no_restart=True)
        if release:
            self._release([r.pg for r in replicas])

    def _release(self, pgs: list[str | None]) -> None:
        for pg in pgs:
            if pg is not None:
                remove_placement_group(_pg(pg))

    def _replace_all(self) -> tuple[tuple[ReplicaRecord, ...], ...]:
        """Fresh replicas for every current one, in the same bundles (same counts): the old
        ones are killed first, so this needs no free resources."""
        old = [r for group in self._state.replicas for r in group]
        self._kill(old, release=False)
        fresh = iter(
            self._start([e for e, group in enumerate(self._state.replicas) for _ in group], pgs=[r.pg for r in old])
        )
        return tuple(tuple(next(fresh) for _ in group) for group in self._state.replicas)

    def _publish(self, replicas: tuple[tuple[ReplicaRecord, ...], ...]) -> None:
        self._state.replicas = replicas
        self._state.version += 1
        self._save()

    def _save(self) -> None:
        save_state(self.cfg.group, self.cfg.namespace, self._state)

    def _topology(self) -> Topology:
        s = self._state
        return Topology(
            version=s.version,
            replicas=tuple(tuple(self._handles[r.name] for r in group) for group in s.replicas),
            graph_owner=s.graph_owner,
        )

    def _live(self, trunk_id: str, now: float) -> bool:
        return now - self._last_seen.get(trunk_id, 0.0) < self.cfg.trunk_timeout_s

    def _reap(self) -> None:
        """Kill retiring replicas no live trunk can still be using."""
        s, now, wall = self._state, time.monotonic(), time.time()
        oldest_ack = min((t.acked for tid, t in s.trunks.items() if self._live(tid, now)), default=s.version)
        keep, gone = [], []
        for version, deadline, r in s.retiring:
            (gone if version <= oldest_ack or wall >= deadline else keep).append((version, deadline, r))
        if gone:
            self._kill([r for _, _, r in gone])
            s.retiring = keep
            self._save()

    def _holder_alive(self, now: float) -> bool:
        """Whether the lease holder is still there: its actor (or the job of its driver) is
        not dead, and a driver's trunk polled within `trunk_timeout_s`."""
        holder = self._state.trunks.get(self._state.graph_owner)
        if holder is None:
            return False
        if holder.actor_id is not None:
            return actor_state(holder.actor_id) != "DEAD"  # a busy actor may not poll
        if holder.job_id is not None and any(
            j["JobID"] == holder.job_id and j["IsDead"] for j in ray._private.state.jobs()
        ):
            return False
        return self._live(self._state.graph_owner, now)

    # ---- trunks ----

    def register_trunk(
        self, trunk_id: str, want_graph: bool, actor_id: str | None = None, job_id: str | None = None
    ) -> Topology:
        """A trunk joins the group; it gets the compiled-graph lease if it wants it and the
        lease is free (or its holder is gone; see the module docstring)."""
        with self._lock:
            s, now = self._state, time.monotonic()
            s.trunks[trunk_id] = TrunkRecord(acked=0, actor_id=actor_id, job_id=job_id)
            self._last_seen[trunk_id] = now
            replicas = s.replicas
            if want_graph and (s.graph_owner is None or not self._holder_alive(now)):
                if s.graph_owner is not None:
                    log.warning("lease holder %s died without teardown: replacing replicas", s.graph_owner)
                    s.trunks.pop(s.graph_owner, None)
                    s.graph_owner = None
                    self._save()
                    replicas = self._replace_all()
                s.graph_owner = trunk_id
                self._publish(replicas)  # a new version tells every trunk who holds the lease
            else:
                self._save()
            return self._topology()

    def unregister_trunk(self, trunk_id: str) -> None:
        with self._lock:
            s = self._state
            s.trunks.pop(trunk_id, None)
            self._last_seen.pop(trunk_id, None)
            if s.graph_owner == trunk_id:
                s.graph_owner = None
            self._save()
            self._reap()

    def version(self, trunk_id: str | None = None) -> int:
        """The current topology version; a trunk's poll also marks it alive, and retires
        replicas whose deadline passed (unless a heal holds the lock: never wait here)."""
        if trunk_id in self._state.trunks:
            self._last_seen[trunk_id] = time.monotonic()
        if self._state.retiring and self._lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self._lock.release()
        return self._state.version

    def topology(self) -> Topology:
        with self._lock:
            return self._topology()

    def fingerprint(self) -> ModelFingerprint:
        """What the group serves (recorded at launch): attach checks a model against it."""
        return self._state.fingerprint

    def pid(self) -> int:
        import os

        return os.getpid()

    def ack(self, trunk_id: str, version: int) -> None:
        """The trunk now runs on `version`: replicas retired before it may go."""
        with self._lock:
            trunk = self._state.trunks.get(trunk_id)
            if trunk is None:
                return  # the trunk left already (calls to a threaded actor may overtake each other)
            self._state.trunks[trunk_id] = TrunkRecord(
                acked=max(trunk.acked, version), actor_id=trunk.actor_id, job_id=trunk.job_id
            )
            self._last_seen[trunk_id] = time.monotonic()
            self._save()
            self._reap()

    # ---- admin ----

    def scale(self, expert: int, replicas: int) -> Topology:
        """Set expert `expert`'s replica count; returns once new replicas answer. New bundles
        are reserved and replicas started without holding the registry lock."""
        num_routed = len(self._state.replicas)
        if not 0 <= expert < num_routed:
            raise ValueError(f"expert {expert} does not exist: routed experts are 0..{num_routed - 1}")
        if replicas < 1:
            raise ValueError(f"replicas={replicas}: every expert needs at least 1 replica")
        with self._scale_lock:
            have = len(self._state.replicas[expert])
            started = (
                self._start([expert] * (replicas - have), placement_timeout_s=self.cfg.placement_timeout_s)
                if replicas > have
                else []
            )
            with self._lock:
                s = self._state
                group = s.replicas[expert] + tuple(started)  # heal may have changed it meanwhile
                group, retired = group[:replicas], group[replicas:]
                if not started and not retired:
                    return self._topology()
                self._publish(s.replicas[:expert] + (group,) + s.replicas[expert + 1 :])
                s.retiring += [(s.version, time.time() + self.cfg.trunk_timeout_s, r) for r in retired]
                self._save()
                self._reap()
                log.info("expert %d now has %d replicas (topology v%d)", expert, len(group), s.version)
                return self._topology()

    def heal(self, trunk_id: str | None = None, reset: bool = False) -> Topology:
        """After a failed exchange: keep replicas that answer (restarted ones included), drop
        the rest, replace an expert's last replica (in its bundle) if it is gone. The dropped
        ones leave the registry before any replacement starts, so `status` never lists them.
        `reset` (the lease holder's graph timed out: its loops may be wedged though every actor
        answers) replaces all replicas. Always bumps the version."""
        with self._lock:
            s = self._state
            flat = [r for group in s.replicas for r in group]
            probed = iter(self._probe([self._handles.get(r.name) for r in flat]))
            alive, dead = [], []
            for e, group in enumerate(s.replicas):
                keep = []
                for r in group:
                    (keep if next(probed) is not None else dead).append(r)
                alive.append(tuple(keep))
            if dead:
                for r in dead:
                    log.warning("replica %s is gone; dropping it", r.name)
                self._kill(dead, release=False)
                reuse: dict[int, str | None] = {}  # expert left with no replica → a dead one's bundle
                release = []
                for e, group in enumerate(s.replicas):
                    gone = [r for r in group if r in dead]
                    if gone and not alive[e]:
                        reuse[e] = gone[0].pg
                        gone = gone[1:]
                    release += [r.pg for r in gone]
                self._release(release)
                # Out of the registry before anything else can fail (no version bump: trunks
                # never see an expert without replicas; `status` reads the registry).
                s.replicas = tuple(alive)
                self._save()
                for e, pg in reuse.items():
                    try:
                        alive[e] = tuple(self._start([e], pgs=[pg]))
                    except ExpertUnavailableError:
                        self._release([pg])
                        raise
                    s.replicas = tuple(alive)
                    self._save()
            for e, group in enumerate(s.replicas):
                if not group:  # an earlier replacement failed: try again in a new bundle
                    alive[e] = tuple(self._start([e]))
                    s.replicas = tuple(alive)
                    self._save()
            if reset and trunk_id is not None and trunk_id == s.graph_owner:
                log.warning("compiled exchange of %s timed out: replacing all replicas", trunk_id)
                self._publish(self._replace_all())
            self._publish(s.replicas)
            return self._topology()

    def report_routing(self, sample: RoutingSample) -> None:
        with self._stats_lock:
            self._routing.add(sample)

    def status(self) -> ExpertStatus:
        """Per expert the replicas that serve (the GCS says ALIVE), and those Ray is restarting;
        a replica that died for good is never listed."""
        with self._stats_lock:
            totals = self._routing.totals()
        now = time.monotonic()
        s = self._state
        rows = []
        for e, group in enumerate(s.replicas):
            states = [actor_state(r.actor_id) for r in group]
            serving = [r for r, st in zip(group, states) if st == "ALIVE"]
            rows.append(
                ExpertRow(
                    expert=e,
                    replicas=len(serving),
                    nodes=tuple(r.node for r in serving),
                    actor_ids=tuple(r.actor_id for r in serving),
                    tokens=totals.tokens_E[e],
                    restarting=sum(st in ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY") for st in states),
                )
            )
        return ExpertStatus(
            group=self.cfg.group,
            version=s.version,
            window_s=totals.window_s,
            experts=tuple(rows),
            experts_per_token_L=totals.experts_per_token_L,
            routed_per_token_L=totals.routed_per_token_L,
            trunks=sum(self._live(t, now) for t in s.trunks),
            graph_owner=s.graph_owner,
        )

    def shutdown(self) -> None:
        """Kill every replica, release their bundles, drop the weights and the stored state
        (the caller then kills this actor)."""
        with self._lock:
            s = self._state
            self._kill([r for group in s.replicas for r in group] + [r for _, _, r in s.retiring])
            s.replicas, s.retiring = (), []
            delete_state(self.cfg.group, self.cfg.namespace)
            try:
                ray.kill(ray.get_actor(keeper_name(self.cfg.group), namespace=self.cfg.namespace))
            except ValueError:
                pass  # launched from a checkpoint folder: no keeper
