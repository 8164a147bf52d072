"""The `experts status` report: one row per routed expert, plus per-layer routing means."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ExpertRow:
    """expert: routed expert index. replicas / nodes / actor_ids: the replicas serving now (one
    entry each); restarting: replicas Ray is restarting (not serving yet). tokens: token-expert
    assignments routed to it (all layers) in the window."""

    expert: int
    replicas: int
    nodes: tuple[str, ...]
    actor_ids: tuple[str, ...]
    tokens: int
    restarting: int = 0


@dataclass(frozen=True)
class ExpertStatus:
    """A group's state. version: topology version (bumps on every scale or recovery).
    experts_per_token_L: mean experts chosen per token (routed + null) per layer;
    routed_per_token_L: mean routed experts per token per layer; both over the window."""

    group: str
    version: int
    window_s: float
    experts: tuple[ExpertRow, ...]
    experts_per_token_L: tuple[float, ...]
    routed_per_token_L: tuple[float, ...]
    trunks: int
    graph_owner: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def format_status(s: ExpertStatus) -> str:
    """A table for terminals: the numbers an admin scales by."""
    total = sum(r.tokens for r in s.experts)
    lines = [
        f"group {s.group!r}  topology v{s.version}  trunks {s.trunks}  "
        f"compiled-graph owner {s.graph_owner or '-'}  window {s.window_s:g}s",
        f"{'expert':>6}  {'replicas':>8}  {'tokens':>10}  {'share':>6}  nodes",
    ]
    for r in s.experts:
        share = f"{100 * r.tokens / total:5.1f}%" if total else "    -"
        restarting = f"  (+{r.restarting} restarting)" if r.restarting else ""
        lines.append(f"{r.expert:>6}  {r.replicas:>8}  {r.tokens:>10}  {share:>6}  {', '.join(r.nodes)}{restarting}")
    for label, means in (("(routed + null)", s.experts_per_token_L), ("(routed only)  ", s.routed_per_token_L)):
        lines.append(f"mean experts per token {label} by layer: " + " ".join(f"{v:.2f}" for v in means))
    return "\n".join(lines)
