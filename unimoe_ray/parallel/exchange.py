"""Token-exchange transports between a trunk process and its expert replica actors.

Both take one payload per slot (a `wire.encode_call` message, or None for a replica with no
tokens) and return one result per slot, in slot order.

- `CompiledExchange`: a Ray Compiled Graph built once per topology: InputNode attribute i
  feeds slot i's actor (Ray gives each attribute its own shared-memory channel, so an actor reads
  only its own rows), and a MultiOutputNode gathers the replies. The layer index rides in the
  payload, so the same graph serves every layer and step; the graph is rebuilt only when the
  topology changes. Every slot is messaged each exchange (a graph is static); an idle slot
  returns None without computing.
- `PlainExchange`: ordinary actor calls, only to busy slots. No compile step and no exclusivity,
  at ~1 ms of Ray task overhead per call.

Compiled Graph rules this module honours: only the compiling process may execute the graph
(the trunk that owns the exchange), an actor joins one graph at a time (so one compiled trunk
per expert group), and a graph must be torn down before its actors join another.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayError

from unimoe_ray.parallel.wire import ExpertCall

Message = bytes | ExpertCall | None
Reply = bytes | np.ndarray | None

log = logging.getLogger(__name__)

# Failures of the transport or of an actor (not of the expert code): recoverable by healing the
# topology and retrying. RayChannelTimeoutError is a RayChannelError.
EXCHANGE_FAULTS = (RayActorError, RayChannelError, GetTimeoutError)


class Exchange(Protocol):
    def run(self, payloads: Sequence[Message], timeout_s: float) -> list[Reply]: ...

    def close(self) -> None: ...


class PlainExchange:
    def __init__(self, actors: Sequence[ActorHandle]) -> None:
        self.actors = list(actors)

    def run(self, payloads: Sequence[Message], timeout_s: float) -> list[Reply]:
        busy = [i for i, p in enumerate(payloads) if p is not None]
        replies = ray.get([self.actors[i].call.remote(payloads[i]) for i in busy], timeout=timeout_s)
        out: list[Reply] = [None] * len(payloads)
        for i, reply in zip(busy, replies):
            out[i] = reply
        return out

    def close(self) -> None:
        pass


class CompiledExchange:
    def __init__(self, actors: Sequence[ActorHandle]) -> None:
        with InputNode() as inp:
            dag = MultiOutputNode([actor.call.bind(inp[i]) for i, actor in enumerate(actors)])
        # One exchange is in flight at a time (a layer waits for its experts), so one buffer per
        # channel suffices; Ray's default (10) multiplies channel memory by ten, and Ray 2.60
        # does not free a graph's channel buffers at teardown (ray-project/ray#43836), so every
        # recompile (topology change, recovery, unparking) leaks them.
        self._graph = dag.experimental_compile(_max_inflight_executions=1)

    def run(self, payloads: Sequence[Message], timeout_s: float) -> list[Reply]:
        return ray.get(self._graph.execute(*payloads), timeout=timeout_s)

    def close(self) -> None:
        try:
            self._graph.teardown()
        except RayError as err:
            # After an actor died the graph has shut itself down; teardown only tidies up.
            log.debug("compiled exchange teardown after a fault: %s", err)


def make_exchange(kind: str, actors: Sequence[ActorHandle]) -> Exchange:
    return CompiledExchange(actors) if kind == "compiled" else PlainExchange(actors)
