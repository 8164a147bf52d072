"""Balanced subset across tasks (paper §4.1: ~60K samples over the four tasks).

Selection is by a seeded hash of each sample id, not by position, so it does not depend on the
order rows arrive in, and a scarce task is never over-sampled: a task gives at most the rows it
has (no duplicates).
"""

from __future__ import annotations

import hashlib

from unimoe_ray.data.config import BalanceConfig


def equal_targets(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` rows equally over the tasks; a task with fewer rows than its share gives all
    it has and the shortfall is re-split among the others (water-filling).

    Example: available {a: 10, b: 100, c: 100}, total 150 -> {a: 10, b: 70, c: 70}.
    """
    targets = {task: 0 for task in available}
    open_tasks = sorted(t for t, n in available.items() if n > 0)
    left = min(total, sum(available.values()))
    while left > 0 and open_tasks:
        share, extra = divmod(left, len(open_tasks))
        still_open = []
        for rank, task in enumerate(open_tasks):
            want = share + (1 if rank < extra else 0)  # remainder to the first, by name
            take = min(want, available[task] - targets[task])
            targets[task] += take
            left -= take
            if targets[task] < available[task]:
                still_open.append(task)
        if len(still_open) == len(open_tasks):
            break  # everyone took their full share: done
        open_tasks = still_open
    return targets


def resolve_targets(cfg: BalanceConfig, available: dict[str, int]) -> dict[str, int]:
    """Rows to keep per task: explicit targets (tasks not named keep all), else an equal split of
    cfg.total, else everything. Always capped at what is available."""
    if cfg.targets:
        wanted = dict(cfg.targets)
        return {t: min(n, wanted.get(t, n)) for t, n in available.items()}
    if cfg.total is not None:
        return equal_targets(available, cfg.total)
    return dict(available)


def _rank_key(seed: int, sample_id: str) -> str:
    return hashlib.sha1(f"{seed}\0{sample_id}".encode()).hexdigest()


def select_balanced(ids_by_task: dict[str, list[str]], targets: dict[str, int], seed: int) -> set[str]:
    """The first targets[task] ids of each task in seeded-hash order."""
    keep: set[str] = set()
    for task, ids in ids_by_task.items():
        n = min(targets.get(task, len(ids)), len(ids))
        keep.update(sorted(ids, key=lambda sid: _rank_key(seed, sid))[:n])
    return keep
