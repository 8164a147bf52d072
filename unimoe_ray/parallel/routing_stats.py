"""Routing statistics an admin scales by: tokens routed to each expert in the last window, and
the mean number of experts chosen per token in each layer (Top-P's k, paper eq. 1-2).

Trunks count locally (`RoutingAccumulator`, no Ray calls on the hot path) and push a
`RoutingSample` to the controller every few seconds; the controller keeps a time window
(`RoutingWindow`). Counts cover every position a router saw, padding and CFG's unconditional
rows included: that is the compute the experts actually do.

Shape legend: E routed experts, L decoder layers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class RoutingSample:
    """One trunk's routing since its previous report.

    tokens_E: token-expert assignments per routed expert, summed over layers.
    tokens_L: positions routed in each layer. picks_L: Σ_t k_t per layer (routed + null).
    routed_L: Σ_t routed picks per layer (= Σ_E of that layer's counts).
    """

    tokens_E: tuple[int, ...]
    tokens_L: tuple[int, ...]
    picks_L: tuple[int, ...]
    routed_L: tuple[int, ...]


class RoutingAccumulator:
    """Trunk side: adds up each DCMoE forward's routing until `take()`."""

    def __init__(self, *, num_routed: int, num_layers: int) -> None:
        self.num_routed = num_routed
        self.num_layers = num_layers
        self._reset()

    def _reset(self) -> None:
        self.tokens_E = [0] * self.num_routed
        self.tokens_L = [0] * self.num_layers
        self.picks_L = [0] * self.num_layers
        self.routed_L = [0] * self.num_layers

    def add(self, layer_idx: int, k_T: torch.Tensor, counts: Sequence[int]) -> None:
        for e, n in enumerate(counts):
            self.tokens_E[e] += n
        self.tokens_L[layer_idx] += k_T.numel()
        self.picks_L[layer_idx] += int(k_T.sum())
        self.routed_L[layer_idx] += sum(counts)

    def take(self) -> RoutingSample | None:
        """The counts so far (None when nothing was routed), and start afresh."""
        if not any(self.tokens_L):
            return None
        sample = RoutingSample(
            tokens_E=tuple(self.tokens_E),
            tokens_L=tuple(self.tokens_L),
            picks_L=tuple(self.picks_L),
            routed_L=tuple(self.routed_L),
        )
        self._reset()
        return sample


@dataclass(frozen=True)
class RoutingTotals:
    """The window's totals. experts_per_token_L: mean k (routed + null) per layer;
    routed_per_token_L: mean routed experts per token per layer (what costs compute)."""

    window_s: float
    tokens_E: tuple[int, ...]
    experts_per_token_L: tuple[float, ...]
    routed_per_token_L: tuple[float, ...]


class RoutingWindow:
    """Controller side: samples from all trunks over the last `window_s` seconds."""

    def __init__(self, *, num_routed: int, num_layers: int, window_s: float) -> None:
        self.num_routed = num_routed
        self.num_layers = num_layers
        self.window_s = window_s
        self._samples: deque[tuple[float, RoutingSample]] = deque()

    def add(self, sample: RoutingSample, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, sample))

    def totals(self, now: float | None = None) -> RoutingTotals:
        now = time.monotonic() if now is None else now
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        samples = [s for _, s in self._samples]

        def total(field: str, width: int) -> list[int]:
            return [sum(vals) for vals in zip(*(getattr(s, field) for s in samples))] or [0] * width

        tokens_E = total("tokens_E", self.num_routed)
        tokens_L, picks_L, routed_L = (total(f, self.num_layers) for f in ("tokens_L", "picks_L", "routed_L"))

        def mean(num: list[int]) -> tuple[float, ...]:
            return tuple(n / t if t else 0.0 for n, t in zip(num, tokens_L))

        return RoutingTotals(
            window_s=self.window_s,
            tokens_E=tuple(tokens_E),
            experts_per_token_L=mean(picks_L),
            routed_per_token_L=mean(routed_L),
        )
