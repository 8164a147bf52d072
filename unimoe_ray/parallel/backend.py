"""`RayExperts`: the ExpertBackend (unimoe_ray.model.experts) whose routed experts are Ray actors.

Installed on every DCMoE layer of a trunk model. Per layer call it splits the expert-grouped
rows x_ND among the replicas of each expert, runs one exchange (compiled graph or plain calls)
and reassembles y_ND in the same layout; DCMoE then combines with the routing weights on the
trunk. Only hidden states travel: token indices and weights never leave the trunk.

The process that creates a RayExperts owns its compiled graph and must be the one that runs the
model (Ray executes a compiled graph only from the process that compiled it).

Parking: in Ray 2.60 a compiled graph's reader busy-waits for the next message (the shared-memory
channel's ReadAcquire loops on sched_yield), so each replica of an idle graph keeps a core busy.
A watchdog thread tears the graph down after `graph_idle_s` without an exchange; the next
exchange recompiles it (a few hundred ms, once). Each compile costs channel memory that Ray
2.60 never frees (see exchange.py), hence a long default idle time; `compiles` counts them.

Shape legend: N token-expert assignments grouped by expert, n one replica's rows, D model dim.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Sequence

import numpy as np
import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayChannelTimeoutError
from torch.utils.hooks import RemovableHandle

from unimoe_ray.parallel.config import ExpertParallelConfig
from unimoe_ray.parallel.controller import ExpertUnavailableError
from unimoe_ray.parallel.exchange import EXCHANGE_FAULTS, Exchange, make_exchange
from unimoe_ray.parallel.routing_stats import RoutingAccumulator
from unimoe_ray.parallel.topology import Topology, slot_rows
from unimoe_ray.parallel.wire import encode_call, pack, write_into

log = logging.getLogger(__name__)

# Pause between heal attempts while the controller restarts.
CONTROLLER_RETRY_S = 0.2


class RayExperts:
    """Expert backend over one expert group's replica actors.

    exchange_kind: "compiled" when the config asks for it and this trunk holds the group's
    compiled-graph lease (Topology.graph_owner), else "plain"; re-decided on every topology.
    recoveries: exchanges retried after a fault. steps: step boundaries (model forwards) seen.
    compiles: compiled graphs built so far.
    """

    def __init__(self, controller: ActorHandle, cfg: ExpertParallelConfig, *, num_routed: int, num_layers: int) -> None:
        self.controller = controller
        self.cfg = cfg
        self.trunk_id = f"trunk-{uuid.uuid4().hex[:8]}"
        self.stats = RoutingAccumulator(num_routed=num_routed, num_layers=num_layers)
        self.hooks: list[RemovableHandle] = []  # model hooks added by attach_experts
        self.exchange_kind = "plain"  # set by _install
        self.recoveries = 0
        self.steps = 0
        self.compiles = 0
        self.topology: Topology | None = None
        self._exchange: Exchange | None = None  # None: parked (or not built yet)
        self._lock = threading.RLock()  # the exchange is used by the model, parked by the watchdog
        self._last_use = self._last_poll = self._last_flush = time.monotonic()
        self._poll: ray.ObjectRef | None = None
        self._closed = threading.Event()

        ctx = ray.get_runtime_context()
        topology = ray.get(
            controller.register_trunk.remote(
                self.trunk_id, cfg.exchange == "compiled", ctx.get_actor_id(), ctx.get_job_id()
            )
        )
        if cfg.exchange == "compiled" and topology.graph_owner != self.trunk_id:
            log.warning(
                "expert group %r already has a compiled-graph trunk; %s uses plain actor calls "
                "(give each trunk replica its own group for compiled graphs)",
                cfg.group,
                self.trunk_id,
            )
        try:
            self._install_healing(topology)
        except BaseException:
            self._leave()  # never stay registered (or the lease holder) after a failed attach
            raise
        if cfg.exchange == "compiled":
            threading.Thread(target=self._park_when_idle, name="park-idle-graph", daemon=True).start()

    # ---- ExpertBackend ----

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Routed-expert outputs for expert-grouped rows (see ExpertBackend). Retries the
        exchange on a healed topology after an actor or channel fault; raises
        ExpertUnavailableError rather than return a result with an expert missing."""
        if self._closed.is_set():
            raise RuntimeError("this expert backend was closed; attach the model to a group again")
        if torch.is_grad_enabled() and x_ND.requires_grad:
            raise RuntimeError(
                "actor-parallel experts are forward-only (no gradient flows back through the "
                "exchange): run under torch.no_grad()/inference_mode, or train with in-process experts"
            )
        x_bytes = pack(x_ND)
        with self._lock:
            for attempt in range(self.cfg.exchange_retries + 1):
                try:
                    return self._exchange_once(layer_idx, x_bytes, x_ND.dtype, counts).to(x_ND.device)
                except EXCHANGE_FAULTS as err:
                    log.warning("expert exchange failed (layer %d, attempt %d): %s", layer_idx, attempt + 1, err)
                    self._recover(reset=isinstance(err, RayChannelTimeoutError))
        raise ExpertUnavailableError(
            f"layer {layer_idx}: the expert exchange failed {self.cfg.exchange_retries + 1} times; "
            "see the controller's log (`unimoe-ray experts status`)"
        )

    def _exchange_once(
        self, layer_idx: int, x_bytes: np.ndarray, dtype: torch.dtype, counts: Sequence[int]
    ) -> torch.Tensor:
        """One exchange on the current topology → y_ND on the CPU.

        The replies of a compiled exchange are zero-copy views of the graph's channel buffers,
        and a buffer is only reused once its view is freed. So they are copied out and dropped
        in this frame: had `run` held them, a fault's traceback (which keeps `run`'s frame and
        its locals) would pin them, and the graph would deadlock as soon as the channel had no
        unpinned buffer left (seen after a recovery, before this was so).
        """
        if self._exchange is None:
            self._build_exchange()
        self._last_use = time.monotonic()
        rows = slot_rows(counts, self.topology.replica_counts)
        calls = [
            encode_call(layer_idx, x_bytes[start : start + n], dtype, self.cfg.inband_max_bytes) if n else None
            for start, n in rows
        ]
        replies = self._exchange.run(calls, self.cfg.exchange_timeout_s)
        y_ND = torch.empty((x_bytes.shape[0], x_bytes.shape[1] // dtype.itemsize), dtype=dtype)
        for (start, n), reply in zip(rows, replies):
            if n:
                write_into(y_ND[start : start + n], reply)
        return y_ND

    def park(self) -> None:
        """Tear the compiled graph down until the next exchange (see the module docstring)."""
        with self._lock:
            if self._exchange is not None and self.exchange_kind == "compiled":
                self._exchange.close()
                self._exchange = None

    @property
    def parked(self) -> bool:
        return self._exchange is None

    def _park_when_idle(self) -> None:
        """Watchdog thread: park the graph after `graph_idle_s` without an exchange."""
        while not self._closed.wait(self.cfg.graph_idle_s / 4):
            with self._lock:
                if time.monotonic() - self._last_use >= self.cfg.graph_idle_s:
                    self.park()

    # ---- topology ----

    def _install(self, topology: Topology, build: bool = True) -> None:
        """Switch to `topology`: tear down the old exchange, build (compile) the new one, and
        tell the controller that replicas outside it may go. build=False leaves the build to
        the next exchange, inside `run`'s fault handling (a replica may be restarting now)."""
        with self._lock:
            if self._exchange is not None:
                self._exchange.close()
                self._exchange = None
            owner = self.cfg.exchange == "compiled" and topology.graph_owner == self.trunk_id
            self.exchange_kind = "compiled" if owner else "plain"
            self.topology = topology
            if build:
                self._build_exchange()
        self.controller.ack.remote(self.trunk_id, topology.version)

    def _install_healing(self, topology: Topology) -> None:
        """`_install`, healing the group when building the exchange meets a dead replica
        (compiling a graph touches every replica)."""
        for attempt in range(self.cfg.exchange_retries + 1):
            try:
                self._install(topology)
                return
            except EXCHANGE_FAULTS as err:
                if attempt == self.cfg.exchange_retries:
                    raise
                log.warning("building the expert exchange failed (%s): healing the group", err)
                topology = self._heal(reset=False)

    def _build_exchange(self) -> None:
        self._exchange = make_exchange(self.exchange_kind, self.topology.slots)
        if self.exchange_kind == "compiled":
            self.compiles += 1
        self._last_use = time.monotonic()

    def _recover(self, reset: bool) -> None:
        """Heal the group, then rebuild the exchange on the healed topology. If healing raises,
        the broken exchange stays installed, so the next call fails and heals again. `reset`: a
        compiled exchange timed out, so its graph loops may be wedged (see controller)."""
        self.recoveries += 1
        self._install(self._heal(reset), build=False)

    def _heal(self, reset: bool) -> Topology:
        """The controller's `heal`, waiting through a controller restart (its process died:
        Ray brings it back within seconds) up to `restart_timeout_s`."""
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        while True:
            try:
                return ray.get(self.controller.heal.remote(self.trunk_id, reset))
            except (RayActorError, ActorUnavailableError) as err:
                if time.monotonic() >= deadline:
                    raise ExpertUnavailableError(
                        f"the controller of expert group {self.cfg.group!r} did not come back within "
                        f"{self.cfg.restart_timeout_s:g}s to heal the group: {err}"
                    ) from None
                time.sleep(CONTROLLER_RETRY_S)

    def refresh(self) -> None:
        """Adopt the controller's current topology now if it changed (blocking). A controller
        that is restarting is skipped: the next step boundary asks again."""
        try:
            topology = ray.get(self.controller.topology.remote(), timeout=self.cfg.restart_timeout_s)
        except (RayActorError, ActorUnavailableError, GetTimeoutError) as err:
            log.warning("expert controller unavailable (%s); keeping topology v%d", err, self.topology.version)
            return
        if topology.version != self.topology.version:
            self._install(topology, build=False)

    def sync(self) -> None:
        """Step boundary: adopt a new topology if the last poll reported one, start the next
        poll, and push routing statistics when due. Never waits on the controller."""
        self.steps += 1
        now = time.monotonic()
        if self._poll is not None:
            ready, _ = ray.wait([self._poll], timeout=0)
            if ready:
                poll, self._poll = self._poll, None
                try:
                    version = ray.get(poll)
                except (RayActorError, ActorUnavailableError):
                    version = self.topology.version  # the controller is restarting: ask again later
                if version != self.topology.version:
                    self.refresh()
        if self._poll is None and now - self._last_poll >= self.cfg.topology_poll_s:
            self._poll = self.controller.version.remote(self.trunk_id)
            self._last_poll = now
        if now - self._last_flush >= self.cfg.stats_interval_s:
            self.flush_stats()

    def flush_stats(self) -> ray.ObjectRef | None:
        """Send the routing counted since the last flush (returns the call's ref, if any)."""
        self._last_flush = time.monotonic()
        sample = self.stats.take()
        return self.controller.report_routing.remote(sample) if sample is not None else None

    def close(self) -> None:
        """Tear down the exchange and leave the group (its replicas keep running)."""
        if self._closed.is_set():
            return
        self._closed.set()
        for hook in self.hooks:
            hook.remove()
        with self._lock:
            if self._exchange is not None:
                self._exchange.close()
                self._exchange = None
        self._leave()

    def _leave(self) -> None:
        try:
            ray.get(self.controller.unregister_trunk.remote(self.trunk_id), timeout=self.cfg.restart_timeout_s)
        except (RayActorError, ActorUnavailableError, GetTimeoutError) as err:
            # The lease of a trunk that is gone lapses by itself (see controller.py).
            log.warning("could not leave expert group %r: %s", self.cfg.group, err)
