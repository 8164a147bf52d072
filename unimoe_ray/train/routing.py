"""Routing statistics per MoE layer, summed over micro-batches and workers: how many experts a
token uses (paper Fig. 3), how often the null expert is picked, tokens per routed expert
(Fig. 5 when split by task). Padding tokens are left out. Torch only.

Shape legend: T tokens, R dynamic experts (routed + null), E routed experts, H histogram bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from unimoe_ray.config import ModelConfig


@dataclass
class RoutingTally:
    """Counts for each MoE layer (rows): tokens, Σ routed experts chosen, tokens that chose a
    null expert, tokens per routed expert, and a histogram of routed experts per token (0..E)."""

    num_routed: int
    tokens_Y: torch.Tensor  # Y = MoE layers
    routed_sum_Y: torch.Tensor
    null_tokens_Y: torch.Tensor
    per_expert_YE: torch.Tensor
    k_hist_YH: torch.Tensor  # H = E + 1 bins: 0..E routed experts

    @classmethod
    def empty(cls, cfg: ModelConfig) -> "RoutingTally":
        Y = cfg.num_layers if cfg.moe.mode != "dense" else 0
        E = cfg.moe.num_routed
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(E, z(Y), z(Y), z(Y), z(Y, E), z(Y, E + 1))

    def add(self, stats: list, valid_T: torch.Tensor | None) -> None:
        """Add one forward's MoEStats (one per MoE layer)."""
        E = self.num_routed
        for y, st in enumerate(stats):
            mask_TR = st.mask_TR.detach().cpu()
            if valid_T is not None:
                mask_TR = mask_TR[valid_T.bool()]
            routed_TE = mask_TR[:, :E]
            k_T = routed_TE.sum(-1)
            self.tokens_Y[y] += mask_TR.shape[0]
            self.routed_sum_Y[y] += float(k_T.sum())
            self.null_tokens_Y[y] += float(mask_TR[:, E:].any(-1).sum())
            self.per_expert_YE[y] += routed_TE.sum(0).double()
            self.k_hist_YH[y] += torch.bincount(k_T, minlength=E + 1).double()

    def all_reduce(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or self.tokens_Y.numel() == 0:
            return
        flat = torch.cat(
            [
                self.tokens_Y,
                self.routed_sum_Y,
                self.null_tokens_Y,
                self.per_expert_YE.flatten(),
                self.k_hist_YH.flatten(),
            ]
        )
        dist.all_reduce(flat)
        Y, E = self.per_expert_YE.shape
        parts = flat.split([Y, Y, Y, Y * E, Y * (E + 1)])
        self.tokens_Y, self.routed_sum_Y, self.null_tokens_Y = parts[0], parts[1], parts[2]
        self.per_expert_YE = parts[3].view(Y, E)
        self.k_hist_YH = parts[4].view(Y, E + 1)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for ray.train.report / TensorBoard, per layer y:
        moe/L{y}/experts_per_token (routed), moe/L{y}/null_share (tokens that picked the null
        expert), moe/L{y}/tokens_e{e} (tokens routed to expert e)."""
        out: dict[str, float] = {}
        for y in range(self.tokens_Y.numel()):
            n = max(float(self.tokens_Y[y]), 1.0)
            out[f"moe/L{y}/experts_per_token"] = float(self.routed_sum_Y[y]) / n
            out[f"moe/L{y}/null_share"] = float(self.null_tokens_Y[y]) / n
            for e in range(self.num_routed):
                out[f"moe/L{y}/tokens_e{e}"] = float(self.per_expert_YE[y, e])
        return out


@torch.no_grad()
def routing_by_task(model, batches_by_task: dict) -> dict[str, RoutingTally]:
    """One RoutingTally per task from evaluation forwards (eval mode: no jitter).
    `batches_by_task`: task → list of unimoe_ray.train.batches.Batch."""
    was_training = model.training
    model.eval()
    out = {}
    for task, batches in batches_by_task.items():
        tally = RoutingTally.empty(model.cfg)
        for b in batches:
            kw = b.model_kwargs()
            kw.pop("labels_BKL")
            res = model(**kw, return_logits=False)
            tally.add(res.moe_stats, b.attention_mask_BL.reshape(-1))
        out[task] = tally
    model.train(was_training)
    return out


def routing_report(tallies: dict[str, RoutingTally]) -> dict:
    """The numbers behind the plots: per layer, the share of tokens using k routed experts
    (all tasks, paper Fig. 3), the mean routed experts per token of each task, and each routed
    expert's share of a task's tokens (Fig. 5)."""
    tasks = sorted(tallies)
    first = tallies[tasks[0]]
    layers = []
    for y in range(first.tokens_Y.numel()):
        hist = sum(t.k_hist_YH[y] for t in tallies.values())
        tokens = float(sum(t.tokens_Y[y] for t in tallies.values()))
        layers.append(
            {
                "layer": y,
                "tokens": tokens,
                "k_share": (hist / max(tokens, 1.0)).tolist(),
                "mean_routed_experts": float(sum(t.routed_sum_Y[y] for t in tallies.values())) / max(tokens, 1.0),
                "null_share": float(sum(t.null_tokens_Y[y] for t in tallies.values())) / max(tokens, 1.0),
                "mean_routed_experts_by_task": {
                    t: float(tallies[t].routed_sum_Y[y]) / max(float(tallies[t].tokens_Y[y]), 1.0) for t in tasks
                },
                "expert_share_by_task": {
                    t: (tallies[t].per_expert_YE[y] / max(float(tallies[t].tokens_Y[y]), 1.0)).tolist() for t in tasks
                },
            }
        )
    return {"tasks": tasks, "num_routed": first.num_routed, "layers": layers}
