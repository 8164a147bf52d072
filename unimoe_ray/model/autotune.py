"""The start-up measurement that picks the fastest expert kernel (`model/kernels.py`) per
device, weight dtype, expert shape and token count on the machine at hand: `select` times the
candidates on the model's own weights at a ladder of token counts once per (device, dtype, D, F),
registers the choice (`model/kernel_plans.py`) and caches it per machine
(`model/kernel_cache.py`).

Environment:
  UNIMOE_KERNELS=auto     (default) `select` measures, or reads the machine's cached choice;
  UNIMOE_KERNELS=default  no measurement: one fixed formulation per weight dtype (DEFAULT),
                          the same kernels and rounding on every machine (reproducible runs).
Without a `select` call every expert runs its dtype's DEFAULT formulation.

Shape legend: n tokens, D model dim.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from unimoe_ray.model.kernel_cache import cache_path, machine_key, read_cache, write_cache
from unimoe_ray.model.kernel_plans import Plan, register
from unimoe_ray.model.kernels import CANDIDATES, DEFAULT, ExpertWeights, PlanKey, grouped_swiglu, stacked_views

ENV_MODE = "UNIMOE_KERNELS"
# Token counts at which `select` times the candidates; a count n uses the choice measured at
# the smallest ladder point ≥ n (the last one beyond it). Decode sizes are dense, prefill blocks
# sparse.
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 256, 1024)
# A candidate replaces the dtype's default only when faster by this fraction: timing noise on a
# shared machine must not flip the choice (and with it the rounding) from run to run.
MARGIN = 0.03
# A point whose median round is this much slower than its best was disturbed by other load.
NOISY = 1.5


def mode() -> str:
    """UNIMOE_KERNELS: "auto" (measure, or read the cache) or "default" (no selection)."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in ("auto", "default"):
        raise ValueError(
            f"{ENV_MODE}={value!r}: use 'auto' (measure the fastest kernels once per machine) or "
            "'default' (fixed formulation, reproducible across machines)"
        )
    return value


def _cached_plan(entry: dict) -> Plan | None:
    try:
        limits, names = tuple(int(n) for n in entry["limits"]), tuple(str(n) for n in entry["names"])
    except (KeyError, TypeError, ValueError):
        return None
    if len(limits) != len(names) or not names or any(n not in CANDIDATES for n in names):
        return None
    return Plan(limits, names, "cache", {int(k): v for k, v in entry.get("ms", {}).items()})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tolerance(dtype: str) -> tuple[float, float]:
    # fp32 candidates differ by summation order only; bf16 / int8 activations round at 2⁻⁸.
    return (1e-4, 1e-4) if dtype == "fp32" else (3e-2, 3e-2)


def measure(
    weights: list[ExpertWeights],
    *,
    ladder: Iterable[int] | None = None,
    act_dtype: torch.dtype = torch.float32,
    rounds: int = 3,
    max_experts: int = 4,
) -> Plan:
    """Time every applicable candidate on these experts (same key) at each token count of the
    ladder and pick the fastest (the dtype's default unless another beats it by MARGIN).

    Each sample runs the candidate over up to `max_experts` distinct experts in turn, so
    weights come from memory as they do in a decode step, not from the cache. Rounds
    interleave the candidates (rotating order); a candidate's time is its best round (load
    from other processes only ever adds time). A candidate that fails or disagrees with the
    default's output is left out, with a warning.
    """
    w0 = weights[0]
    device = w0.gate_FD.device
    default = DEFAULT[w0.dtype]
    names = [c.name for c in CANDIDATES.values() if c.applies(w0)]
    # "grouped" needs experts stacked in memory: the longest such run at the front (≥ 2).
    stack_n = max((k for k in range(2, min(len(weights), max_experts) + 1) if stacked_views(weights[:k])), default=0)
    if not stack_n or not hasattr(torch, "_grouped_mm") or device.type != "cpu":
        names = [n for n in names if n != "grouped"]
    stack = stacked_views(weights[:stack_n]) if stack_n else None

    def run_once(name: str, x_nD: torch.Tensor, ws: list[ExpertWeights]) -> tuple[torch.Tensor, int]:
        """(expert 0's output, experts run), each expert on its own rows of one grouped input
        and writing into its rows of one output, as a layer runs them (`experts.run_grouped`),
        or all in one `grouped_swiglu` call."""
        n = x_nD.shape[0]
        if name == "grouped":
            return grouped_swiglu(*stack, x_nD.repeat(stack_n, 1), (n,) * stack_n)[:n], stack_n
        fn = CANDIDATES[name].fn
        x_ND = x_nD.repeat(len(ws), 1)
        y_ND = torch.empty_like(x_ND)
        for e, w in enumerate(ws):
            fn(x_ND[e * n : (e + 1) * n], w, y_ND[e * n : (e + 1) * n])
        return y_ND[:n], len(ws)

    gen = torch.Generator(device="cpu").manual_seed(0)
    limits, chosen, ms = [], [], {}
    broken: set[str] = set()
    noisy = 0
    with torch.inference_mode():
        for n in LADDER if ladder is None else ladder:
            ws = weights[: max_experts if n <= 64 else 1]
            x_nD = torch.randn(n, w0.dim, generator=gen).to(device=device, dtype=act_dtype)
            ref = CANDIDATES[default].fn(x_nD, w0)
            live = []
            for name in names:
                if name in broken:
                    continue
                try:
                    y, _ = run_once(name, x_nD, [w0])
                    _sync(device)
                    rtol, atol = _tolerance(w0.dtype)
                    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=atol * float(ref.abs().max()))
                except Exception as e:  # noqa: BLE001 - a kernel missing on this device is data here
                    warnings.warn(f"kernel candidate {name} left out for {w0.key} at {n} tokens: {e}")
                    broken.add(name)
                    continue
                live.append(name)
            best = {name: float("inf") for name in live}
            per_round: list[dict[str, float]] = []
            for r in range(rounds if n <= 64 else max(2, rounds // 2)):
                per_round.append({})
                order = live[r % len(live) :] + live[: r % len(live)]
                for name in order:
                    _sync(device)
                    t0 = time.perf_counter()
                    _, ran = run_once(name, x_nD, ws)
                    _sync(device)
                    t = (time.perf_counter() - t0) / ran
                    best[name] = min(best[name], t)
                    per_round[-1][name] = t
            fastest = min(best, key=best.get)
            # Another candidate replaces the default only when its best round beats the
            # default's by MARGIN *and* it was faster in most rounds (paired, same load).
            wins = sum(r[fastest] < r[default] for r in per_round)
            clear = best[fastest] * (1 + MARGIN) < best[default] and 2 * wins > len(per_round)
            limits.append(n)
            chosen.append(fastest if clear else default)
            ms[n] = {name: round(t * 1e3, 4) for name, t in best.items()}
            spread = sorted(r[default] for r in per_round)
            noisy += spread[len(spread) // 2] > NOISY * best[default]
    # Rounds of one candidate far apart: other processes took the cores meanwhile, and even the
    # best rounds may be off. Such a choice serves this process but is not cached.
    source = "noisy" if noisy * 3 > len(limits) else "measured"
    if source == "noisy":
        warnings.warn(
            f"kernel timings for {w0.key} were disturbed at {noisy} of {len(limits)} token counts "
            "(machine busy): using the choice in this process without caching it"
        )
    return Plan(tuple(limits), tuple(chosen), source, ms)


@dataclass(frozen=True)
class Selection:
    """What `select` did for one expert shape (printed by the benchmarks)."""

    key: PlanKey
    plan: Plan
    experts: int

    def summary(self) -> str:
        runs, last = [], None
        for n, name in zip(self.plan.limits, self.plan.names):
            if name != last:
                runs.append(f"{name}@{n}")
                last = name
        return f"{self.key} ({self.experts} experts, {self.plan.source}): " + ", ".join(runs)


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """Every module with expert weights in kernel form (SwiGLU and the quantised experts)."""
    return [m for m in model.modules() if callable(getattr(m, "expert_weights", None))]


def select(model: nn.Module, *, use_cache: bool = True, remeasure: bool = False, **measure_kw) -> list[Selection]:
    """Pick the fastest kernel per expert shape of `model` on its device: from this machine's
    cache, else by `measure` (then cached). Under UNIMOE_KERNELS=default: nothing (defaults)."""
    if mode() == "default":
        return []
    groups: dict[PlanKey, list[ExpertWeights]] = {}
    experts = expert_modules(model)
    for m in experts:
        w = m.expert_weights()
        groups.setdefault(w.key, []).append(w)
    # Time with the activations the model will feed its experts (its non-expert dtype).
    expert_params = {id(p) for m in experts for p in m.parameters()}
    act = [p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in expert_params]
    measure_kw.setdefault("act_dtype", act[0] if act else torch.float32)
    if not groups:
        return []
    out = []
    by_device: dict[str, list[PlanKey]] = {}
    for key in groups:
        by_device.setdefault(key.device, []).append(key)
    for dev_type, keys in by_device.items():
        device = groups[keys[0]][0].gate_FD.device
        mkey = machine_key(device)
        path = cache_path()
        cached = read_cache(path)["machines"].get(mkey, {}) if use_cache else {}
        new_entries = {}
        for key in keys:
            plan = None if remeasure else _cached_plan(cached.get(str(key), {}))
            if plan is None:
                plan = measure(groups[key], **measure_kw)
            if plan.source == "measured":
                new_entries[str(key)] = {
                    "limits": list(plan.limits),
                    "names": list(plan.names),
                    "ms": {str(k): v for k, v in plan.ms.items()},
                    "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
            out.append(Selection(key, register(key, plan), len(groups[key])))
        if new_entries and use_cache:
            write_cache(path, mkey, new_entries)
    return out
