"""Expert parallelism for training: each rank of an expert-parallel (EP) group of N ranks holds
E/N routed experts of every DCMoE layer; a layer's routed tokens travel to the rank owning their
expert by all_to_all, are computed there, and travel back (DeepSpeed-MoE's scheme, dropless:
variable splits instead of capacity-padded slots). torch + torch.distributed only.

Ranks and groups, for W ranks and EP size N (DeepSpeed-MoE's layout):
- EP groups: consecutive blocks of N ranks ({0..N-1}, {N..2N-1}, ...). The block's rank at
  position i holds experts [i·E/N, (i+1)·E/N) of every layer.
- expert-data-parallel (EDP) groups: the ranks at the same position in their blocks
  ({i, N+i, 2N+i, ...}): they hold the same experts and reduce those experts' gradients.
- everything else (attention, router, shared experts, embeddings, heads) is replicated on all
  W ranks and reduced over all of them.

DCMoE.forward stays the one routing and combine path: this module only replaces the expert
backend (`ExpertParallelExperts.run`), which receives the layer's assignments grouped by
expert and returns their outputs in the same order.

Shape legend: N assignments on this rank (grouped by expert), M assignments received
(grouped by source rank, then local expert), D model dim, E routed experts, L local experts
(E / ep_size), G ep_size, Y MoE layers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from unimoe_ray.model.experts import LocalExperts
from unimoe_ray.model.moe import DCMoE


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the W = blocks × ep_size layout and its process groups.
    `ep_group` / `edp_group` are None where the group has one rank (nothing to exchange)."""

    world_size: int
    rank: int
    ep_size: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]

    @property
    def ep_rank(self) -> int:
        """Position in the EP block: which slice of the experts this rank holds."""
        return self.rank % self.ep_size


def check_sizes(*, world_size: int, ep_size: int, num_routed: int | None = None) -> None:
    """The expert-parallel size must divide the number of ranks and of routed experts."""
    if ep_size < 1:
        raise ValueError(f"expert-parallel size {ep_size}: must be >= 1")
    if world_size % ep_size:
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide the {world_size} workers: use a "
            f"divisor of {world_size} (--expert-parallel) or change --num-workers"
        )
    if num_routed is not None and num_routed % ep_size:
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide the {num_routed} routed experts per "
            f"layer: each rank must hold the same number of experts; use a divisor of {num_routed}"
        )


def make_groups(ep_size: int) -> ExpertParallelGroups:
    """Create the EP and EDP process groups (a collective: every rank calls it, in the same
    order, after the default process group is up)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs torch.distributed's default process group first")
    W, r = dist.get_world_size(), dist.get_rank()
    check_sizes(world_size=W, ep_size=ep_size)
    ep_ranks = edp_ranks = ()
    ep_group = edp_group = None
    # new_group is collective over the whole world: every rank creates every group.
    for start in range(0, W, ep_size):
        ranks = tuple(range(start, start + ep_size))
        group = dist.new_group(list(ranks)) if ep_size > 1 else None
        if r in ranks:
            ep_ranks, ep_group = ranks, group
    for pos in range(ep_size):
        ranks = tuple(range(pos, W, ep_size))
        group = dist.new_group(list(ranks)) if len(ranks) > 1 else None
        if r in ranks:
            edp_ranks, edp_group = ranks, group
    return ExpertParallelGroups(
        world_size=W,
        rank=r,
        ep_size=ep_size,
        ep_group=ep_group,
        edp_group=edp_group,
        ep_ranks=ep_ranks,
        edp_ranks=edp_ranks,
    )


class ExchangeTimer:
    """Wall seconds spent inside the exchanges (forward and backward; on a blocking backend
    such as gloo that includes waiting for the slowest rank of the group)."""

    def __init__(self) -> None:
        self.seconds = 0.0


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits whose backward is the reverse exchange.

    torch 2.13 has one (torch.distributed.nn.functional.all_to_all_single: it backprops over
    gloo, checked with 2 processes) but deprecates it with a warning on every call, pointing at
    the private torch.distributed._functional_collectives; this is the public collective with
    the ten lines of autograd it needs."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group, timer) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.timer = (out_splits, in_splits), group, timer
        t0 = time.perf_counter()
        y_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(y_MD, x_ND.contiguous(), out_splits, in_splits, group=group)
        timer.seconds += time.perf_counter() - t0
        return y_MD

    @staticmethod
    def backward(ctx, grad_MD):
        out_splits, in_splits = ctx.splits
        t0 = time.perf_counter()
        grad_ND = grad_MD.new_empty((sum(in_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_MD.contiguous(), in_splits, out_splits, group=ctx.group)
        ctx.timer.seconds += time.perf_counter() - t0
        return grad_ND, None, None, None, None


def all_to_all(
    x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group, timer: ExchangeTimer | None = None
) -> torch.Tensor:
    """Rows [Σ in_splits[:j], +in_splits[j]) go to rank j of `group`; returns the rows received,
    rank by rank (out_splits[j] from rank j). Differentiable."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group, timer or ExchangeTimer())


class ExpertElsewhere(nn.Module):
    """Stands in `DCMoE.routed_experts` for an expert another rank of the EP group holds: no
    parameters (the expert's memory is freed), and an error if anything tries to run it."""

    def __init__(self, expert_idx: int, owner: int) -> None:
        super().__init__()
        self.expert_idx, self.owner = expert_idx, owner

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"routed expert {self.expert_idx} lives on expert-parallel rank {self.owner}: this "
            "model is sharded (unimoe_ray.model.expert_parallel.shard_experts); its tokens go "
            "there through the layer's ExpertParallelExperts backend"
        )

    def extra_repr(self) -> str:
        return f"expert={self.expert_idx}, owner=ep rank {self.owner}"


class ExpertParallelExperts:
    """The expert backend of one DCMoE layer on one EP rank (ExpertBackend protocol).

    `run` is a collective over the EP group: every rank calls it for every layer, also with no
    tokens of its own (DCMoE calls a backend whose `collective` is true unconditionally).
    Routing statistics of training forwards (autograd on) accumulate in `sent_E` (assignments
    this rank sent to each expert) and `received_L` (assignments each local expert received),
    the exchanges' wall time (counts and rows, forward and backward) in `timer`; `take_stats`
    reads and clears them.
    """

    collective = True

    def __init__(
        self, experts: Sequence[nn.Module], *, first_expert: int, num_routed: int, groups: ExpertParallelGroups
    ) -> None:
        self.local = LocalExperts(nn.ModuleList(experts))
        self.first_expert = first_expert
        self.num_routed = num_routed
        self.groups = groups
        self.sent_E = torch.zeros(num_routed, dtype=torch.int64)
        self.received_L = torch.zeros(len(experts), dtype=torch.int64)
        self.timer = ExchangeTimer()

    def run(self, layer_idx: int, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        G, L = self.groups.ep_size, len(self.local.experts)
        group = self.groups.ep_group
        # 1. Counts first: rank j learns how many rows of each of its experts every rank sends.
        # (gloo exchanges CPU tensors, nccl/hccl device tensors: the counts live with x.)
        counts_E = torch.tensor(list(counts), dtype=torch.int64, device=x_ND.device)
        recv_GL = torch.empty(G * L, dtype=torch.int64, device=x_ND.device)
        t0 = time.perf_counter()
        dist.all_to_all_single(recv_GL, counts_E, group=group)
        recv_GL = recv_GL.view(G, L).cpu()
        self.timer.seconds += time.perf_counter() - t0
        send = counts_E.view(G, L).sum(1).tolist()
        recv = recv_GL.sum(1).tolist()
        if torch.is_grad_enabled():
            self.sent_E += counts_E.cpu()
            self.received_L += recv_GL.sum(0)
            if not x_ND.requires_grad:
                # The reverse exchanges in backward are collectives too: every rank must run
                # them, so the graph through them must not hang on whether this rank's rows
                # need a gradient. That can differ between ranks (only ranks with video rows
                # carry a trainable vision tower's output; a frozen trunk's first layer on one
                # rank, trainable experts fed by another): always differentiable.
                x_ND = x_ND.detach().requires_grad_()
        # 2. The rows themselves, variable splits: received grouped by source rank, then local
        # expert (each source sends its rows grouped by expert).
        x_MD = all_to_all(x_ND, recv, send, group, self.timer)
        # 3. Local experts, on rows regrouped expert by expert.
        order_M = _expert_major_order(recv_GL).to(x_MD.device) if G > 1 and L > 1 else None
        xe_MD = x_MD if order_M is None else x_MD.index_select(0, order_M)
        local_counts = recv_GL.sum(0).tolist()
        if sum(local_counts):
            ye_MD = self.local.run(layer_idx, xe_MD, local_counts)
        else:
            ye_MD = xe_MD.clone()  # no rows: still part of the graph, so backward exchanges too
        y_MD = ye_MD if order_M is None else ye_MD.index_select(0, torch.argsort(order_M))
        # 4. Back to the senders, in the order they sent.
        return all_to_all(y_MD, send, recv, group, self.timer)

    def take_stats(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(sent_E, received_E, exchange seconds) since the last call; received_E is zero
        outside this rank's experts."""
        received_E = torch.zeros(self.num_routed, dtype=torch.int64)
        received_E[self.first_expert : self.first_expert + len(self.received_L)] = self.received_L
        sent_E, seconds = self.sent_E.clone(), self.timer.seconds
        self.sent_E.zero_()
        self.received_L.zero_()
        self.timer.seconds = 0.0
        return sent_E, received_E, seconds


def _expert_major_order(recv_GL: torch.Tensor) -> torch.Tensor:
    """Row indices that turn (source rank, local expert)-ordered rows into (local expert,
    source rank) order."""
    G, L = recv_GL.shape
    blocks = torch.arange(int(recv_GL.sum())).split(recv_GL.flatten().tolist())
    return torch.cat([blocks[j * L + e] for e in range(L) for j in range(G)])


def dcmoe_layers(model: nn.Module) -> list[DCMoE]:
    layers = [m for m in model.modules() if isinstance(m, DCMoE)]
    if not layers:
        raise ValueError(
            "expert parallelism needs a DCMoE model: this one has no routed experts "
            "(moe.mode='dense', a stage-1 specialist); train it with --expert-parallel 1"
        )
    return layers


def shard_experts(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Keep routed experts [p·E/G, (p+1)·E/G) of every DCMoE layer (p: this rank's position in
    its EP block, G: ep_size) and free the others; install the all_to_all backend.

    The kept experts stay at their global index in `routed_experts` (state_dict names are the
    unsharded model's, so checkpoints and optimizer state are keyed by global expert), the
    others become parameter-free `ExpertElsewhere` placeholders. Call before building the
    optimizer: it must not hold the freed parameters.
    """
    G = groups.ep_size
    for moe in dcmoe_layers(model):
        E = len(moe.routed_experts)
        check_sizes(world_size=groups.world_size, ep_size=G, num_routed=E)
        L = E // G
        first = groups.ep_rank * L
        kept = [moe.routed_experts[k] for k in range(first, first + L)]
        for k in range(E):
            if not first <= k < first + L:
                moe.routed_experts[k] = ExpertElsewhere(k, owner=k // L)
        moe.expert_backend = ExpertParallelExperts(kept, first_expert=first, num_routed=E, groups=groups)


def is_expert_param(name: str) -> bool:
    """A routed expert's parameter (held by one EP rank, reduced over the EDP group)."""
    return ".routed_experts." in name


def _reduce(grads: list[torch.Tensor], group, divisor: int) -> None:
    """Sum `grads` over `group` in one flat buffer, divide by `divisor`, in place."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat.div_(divisor)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_gradients(named_params: Sequence[tuple[str, nn.Parameter]], groups: ExpertParallelGroups) -> None:
    """All-reduce the gradients of a sharded model after the window's backward.

    Every rank's loss already counts all workers (unimoe_ray.train.step scales it by W, as for
    DDP's average), so the objective's gradient is Σ over all W ranks' loss gradients / W:
    - replicated parameters: summed over all W ranks, / W (DDP's average);
    - routed experts: the all_to_all backward already summed the N senders of the EP group on
      the owner; summed over the EDP group (the W/N owners of the same expert), / W. (That is
      the EDP average of each owner's gradient divided by N.)
    Like DDP with find_unused_parameters, a parameter no rank of its reduction group used keeps
    `grad` None (AdamW then skips it); one used anywhere gets the reduced gradient everywhere.
    """
    W = groups.world_size
    for expert in (False, True):
        params = [p for n, p in named_params if p.requires_grad and is_expert_param(n) == expert]
        group = groups.edp_group if expert else (dist.group.WORLD if W > 1 else None)
        if not params:
            continue
        # nccl/hccl reduce device tensors only: the flags live with the parameters.
        used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        if group is not None:
            dist.all_reduce(used, op=dist.ReduceOp.MAX, group=group)
        grads = []
        for p, u in zip(params, used.tolist()):
            if not u:
                p.grad = None
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        _reduce(grads, group, W)


def clip_grad_norm(
    named_params: Sequence[tuple[str, nn.Parameter]], max_norm: float, groups: ExpertParallelGroups
) -> float:
    """Clip by the norm of the whole model's gradient (every expert counted once) and return
    it; the same factor on every rank, so replicated parameters stay equal. The EP group
    together holds each expert once: its experts' squared norms are summed over it."""
    replicated, experts = [], []
    for n, p in named_params:
        if p.grad is not None:
            (experts if is_expert_param(n) else replicated).append(p.grad)

    device = named_params[0][1].device if named_params else torch.device("cpu")

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        # float64: torch's clip_grad_norm_ sums each tensor in float32, ~4e-5 off on a
        # 400k-element gradient here; the reported norm should not depend on the sharding.
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([g.detach().double().norm() for g in grads]).square().sum()

    expert_sq = sq(experts).reshape(1)
    if groups.ep_group is not None:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    total = float(torch.sqrt(sq(replicated) + expert_sq[0]))
    if math.isfinite(max_norm):
        coef = min(max_norm / (total + 1e-6), 1.0)
        if coef < 1.0:
            for g in replicated + experts:
                g.mul_(coef)
    return total


def take_exchange_stats(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(sent_YE, received_YE, seconds): per MoE layer, the routed assignments this rank sent to
    each expert and those its own experts received, and the wall time of all exchanges, since
    the last call (training forwards and their backward only)."""
    stats = [
        m.expert_backend.take_stats()
        for m in dcmoe_layers(model)
        if isinstance(m.expert_backend, ExpertParallelExperts)
    ]
    if not stats:
        raise ValueError("the model is not sharded: call shard_experts first")
    return torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]), sum(s[2] for s in stats)
