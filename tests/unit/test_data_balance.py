"""Balanced subset selection (unimoe_ray.data.balance)."""

from __future__ import annotations

from unimoe_ray.data.balance import equal_targets, resolve_targets, select_balanced
from unimoe_ray.data.config import BalanceConfig


def _ids(task: str, n: int) -> list[str]:
    return [f"{task}-{i:04d}" for i in range(n)]


def test_equal_targets_water_fills_around_the_scarce_task():
    assert equal_targets({"a": 10, "b": 100, "c": 100}, 150) == {"a": 10, "b": 70, "c": 70}
    assert equal_targets({"a": 10, "b": 100, "c": 100}, 31) == {"a": 10, "b": 11, "c": 10}
    assert equal_targets({"a": 5, "b": 7}, 100) == {"a": 5, "b": 7}  # asks for more than exists
    assert equal_targets({"a": 0, "b": 9}, 6) == {"a": 0, "b": 6}


def test_resolve_targets():
    available = {"tts_en": 50, "t2m": 20, "v2m": 5}
    assert resolve_targets(BalanceConfig(), available) == available  # stage 1: keep everything
    explicit = BalanceConfig(targets=(("tts_en", 30), ("v2m", 10)))
    assert resolve_targets(explicit, available) == {"tts_en": 30, "t2m": 20, "v2m": 5}
    assert resolve_targets(BalanceConfig(total=45), available) == {"tts_en": 20, "t2m": 20, "v2m": 5}


def test_select_hits_targets_without_duplicates_and_is_seeded():
    ids = {"tts_en": _ids("tts_en", 200), "t2m": _ids("t2m", 40), "v2m": _ids("v2m", 7)}
    targets = {"tts_en": 50, "t2m": 50, "v2m": 50}
    keep = select_balanced(ids, targets, seed=0)
    per_task = {t: len([s for s in keep if s.startswith(t)]) for t in ids}
    assert per_task == {"tts_en": 50, "t2m": 40, "v2m": 7}  # scarce tasks give what they have
    assert select_balanced(ids, targets, seed=0) == keep
    other = select_balanced(ids, targets, seed=1)
    assert other != keep and len(other) == len(keep)
    # order of arrival does not matter: selection is by hash, not position
    shuffled = {t: list(reversed(v)) for t, v in ids.items()}
    assert select_balanced(shuffled, targets, seed=0) == keep
