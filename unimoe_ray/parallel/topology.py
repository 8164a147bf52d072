"""Which actors serve which routed expert, and how one layer's tokens are split among them.

A trunk sends every replica a contiguous share of its expert's rows (rows are independent
through a SwiGLU, so any split gives the same output rows). Slots are the replicas of all
experts flattened in expert order; that order is also the compiled graph's output order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ray.actor import ActorHandle


@dataclass(frozen=True)
class Topology:
    """The controller's registry at one version. replicas[e]: the actors serving expert e;
    graph_owner: the trunk allowed to drive a compiled graph over them (None: nobody)."""

    version: int
    replicas: tuple[tuple[ActorHandle, ...], ...]
    graph_owner: str | None = None

    @property
    def slots(self) -> list[ActorHandle]:
        """All replica actors, expert 0's first."""
        return [actor for group in self.replicas for actor in group]

    @property
    def replica_counts(self) -> tuple[int, ...]:
        return tuple(len(group) for group in self.replicas)


def split_rows(n: int, parts: int) -> list[int]:
    """Near-equal contiguous chunk sizes, larger first: split_rows(10, 3) == [4, 3, 3]."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def slot_rows(counts: Sequence[int], replica_counts: Sequence[int]) -> list[tuple[int, int]]:
    """(start, rows) of each slot in x_ND, whose rows are grouped by expert.

    counts (5, 0, 3) with replicas (1, 2, 2) → [(0, 5), (5, 0), (5, 0), (5, 2), (7, 1)].
    """
    if len(counts) != len(replica_counts):
        raise ValueError(f"{len(counts)} expert counts for {len(replica_counts)} experts in the topology")
    rows: list[tuple[int, int]] = []
    start = 0
    for n, parts in zip(counts, replica_counts):
        for size in split_rows(n, parts):
            rows.append((start, size))
            start += size
    return rows
