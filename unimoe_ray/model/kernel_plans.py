"""Which kernel runs an expert: the plans in force in this process, one per expert shape
(`PlanKey`: device, weight dtype, D, F), each mapping a token count to a candidate of
`model/kernels.py`. `model/autotune.py` measures and registers them; without a plan an expert
runs its dtype's DEFAULT formulation.

Shape legend: n tokens, D model dim, F expert FFN dim.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

import torch

from unimoe_ray.model.kernels import CANDIDATES, DEFAULT, ExpertWeights, PlanKey


@dataclass(frozen=True)
class Plan:
    """Which candidate runs n tokens: names[i] for n ≤ limits[i] (the last beyond)."""

    limits: tuple[int, ...]
    names: tuple[str, ...]
    source: str  # "measured" | "noisy" (measured on a busy machine: not cached) | "cache"
    ms: dict = field(default_factory=dict, compare=False)  # {n: {candidate: ms per expert}}
    fns: tuple = field(default=(), compare=False, repr=False)

    def name_for(self, n: int) -> str:
        return self.names[min(bisect.bisect_left(self.limits, n), len(self.names) - 1)]


_PLANS: dict[PlanKey, Plan] = {}


def _fallback(w: ExpertWeights) -> Callable[..., torch.Tensor]:
    return CANDIDATES[DEFAULT[w.dtype]].fn


def swiglu(w: ExpertWeights, x_nD: torch.Tensor, out_nD: torch.Tensor | None = None) -> torch.Tensor:
    """y_nD = down(silu(gate·x) * up·x) by this machine's chosen kernel (no autograd); written
    into `out_nD` when given (then returned). y has x's dtype."""
    plan = _PLANS.get(w.key)
    if plan is None:
        return _fallback(w)(x_nD, w, out_nD)
    i = min(bisect.bisect_left(plan.limits, x_nD.shape[0]), len(plan.fns) - 1)
    return plan.fns[i](x_nD, w, out_nD)


def plans() -> dict[PlanKey, Plan]:
    """The plans in force in this process."""
    return dict(_PLANS)


def clear() -> None:
    """Forget every plan in this process (the defaults apply again)."""
    _PLANS.clear()


def register(key: PlanKey, plan: Plan) -> Plan:
    unknown = [n for n in plan.names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown kernel candidates {unknown}: known {sorted(CANDIDATES)}")
    plan = Plan(plan.limits, plan.names, plan.source, plan.ms, tuple(CANDIDATES[n].fn for n in plan.names))
    _PLANS[key] = plan
    return plan


# ---------------------------------------------------------------- a layer's experts at once


def grouped_applies(w: ExpertWeights, counts) -> bool:
    """Whether one `grouped_swiglu` call runs experts shaped like `w` with these token counts
    instead of the per-expert loop: where this machine measured the "grouped" candidate the
    fastest at every active count (`autotune.measure`). Never without a measured plan."""
    plan = _PLANS.get(w.key)
    return plan is not None and all(plan.name_for(n) == "grouped" for n in counts if n)


# The per-expert int8 kernels a layer-level loop reproduces with its casts done once per layer.
INT8_LAYER = {"int8_mm": torch.float32, "int8_mm_bf16": torch.bfloat16}


def int8_layer_dtype(w: ExpertWeights, counts) -> torch.dtype | None:
    """The activation dtype when every active count of int8 experts shaped like `w` runs one
    torch int8 kernel (`int8_mm` or `int8_mm_bf16`, the same at all counts): then `int8_layer`
    computes what the per-expert loop would, with one cast in and one out for the whole layer
    instead of two per expert. Else None."""
    plan = _PLANS.get(w.key)
    if plan is None or w.dtype != "int8":
        return None
    names = {plan.name_for(n) for n in counts if n}
    return INT8_LAYER.get(names.pop()) if len(names) == 1 else None
