"""DCMoE router math (docs/DESIGN.md §1; paper eq. 1-3): Top-P / Top-K selection, combine weights
in the paper's and the released checkpoint's form, capacity limit, aux load-balancing loss.

Pure functions of router logits; no parameters, no dispatch, no Ray.

Shape legend: T tokens, E all experts (routed + null + shared), R dynamic experts
(routed + null: the ones Top-P chooses among), S shared experts.
Router columns are ordered [routed..., null..., shared...].
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Routing:
    """The router's decision for T tokens.

    mask_TR: bool, expert r chosen for token t (routed + null columns).
    weights_TR: combine weight of each chosen dynamic expert (0 where not chosen).
    shared_weights_TS: multiplier of each shared expert per token.
    k_T: experts chosen per token (after any capacity drop).
    aux_loss: scalar load-balancing loss over routed + null experts.
    """

    mask_TR: torch.Tensor
    weights_TR: torch.Tensor
    shared_weights_TS: torch.Tensor
    k_T: torch.Tensor
    aux_loss: torch.Tensor


def top_p_mask(probs_TR: torch.Tensor, p: float, *, order_TR: torch.Tensor | None = None) -> torch.Tensor:
    """Paper eq. 1-2: keep the smallest prefix of experts (by descending probability) whose
    cumulative probability reaches p; k = (#cumsum < p) + 1, so at least one expert is kept.

    probs_TR: softmax over dynamic experts. order_TR: the scores that rank experts (the router
    logits, as the released code picks by highest logit); default the probabilities. Ties go
    to the lower index (a stable sort): in bf16, distinct logits can round to equal
    probabilities, and an unstable sort of those picked other experts than the released code.
    Returns mask_TR (bool).
    """
    scores_TR = probs_TR if order_TR is None else order_TR
    order_TR = _ranked(scores_TR).indices
    return _unsort(_top_p_keep(probs_TR.gather(-1, order_TR), p), order_TR)


def top_k_mask(probs_TR: torch.Tensor, k: int, *, order_TR: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-k selection (the paper's Unify-MoE ablation), ranked as in `top_p_mask`."""
    scores_TR = probs_TR if order_TR is None else order_TR
    return _unsort(_top_k_keep(scores_TR, k), _ranked(scores_TR).indices)


# The selection and the released weights are computed in *ranked* order: each token's dynamic
# experts sorted by logit, highest first, lower index first among equals (one stable sort).
# There the chosen experts are a prefix, "picked before" is a fixed triangle, and the sorted
# probabilities are a gather: about half the small ops of working in expert order, which at
# decode sizes (a few tokens per layer) is most of the router's time. `_unsort` scatters a
# ranked result back to expert order.


def _ranked(scores_TR: torch.Tensor) -> torch.return_types.sort:
    return scores_TR.sort(dim=-1, descending=True, stable=True)


def _unsort(ranked_TR: torch.Tensor, order_TR: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(ranked_TR).scatter(-1, order_TR, ranked_TR)


@functools.lru_cache(maxsize=None)
def _consts(num: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank_R, earlier_RR): ranks 0..R-1, and earlier[i, j] = rank j comes before rank i.
    Made outside inference mode so that autograd code may read them too."""
    with torch.inference_mode(False):
        rank_R = torch.arange(num, device=device)
        return rank_R, rank_R[None, :] < rank_R[:, None]


def _top_p_keep(ranked_probs_TR: torch.Tensor, p: float) -> torch.Tensor:
    """Ranked keep mask: rank r is kept when the cumsum before it is < p (rank 0 always),
    i.e. ranks ≤ #(cumsum < p) — k = that count + 1, as the released code."""
    below_T1 = (ranked_probs_TR.cumsum(dim=-1) < p).sum(dim=-1, keepdim=True)
    rank_R, _ = _consts(ranked_probs_TR.shape[-1], ranked_probs_TR.device)
    return rank_R <= below_T1


def _top_k_keep(scores_TR: torch.Tensor, k: int) -> torch.Tensor:
    rank_R, _ = _consts(scores_TR.shape[-1], scores_TR.device)
    return (rank_R < k).expand(scores_TR.shape)


def paper_weights(probs_TR: torch.Tensor, mask_TR: torch.Tensor) -> torch.Tensor:
    """Paper eq. 3: selected probabilities renormalised to sum 1 per token."""
    w_TR = probs_TR * mask_TR
    return w_TR / w_TR.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w_TR.dtype).tiny)


def _ranked_multipliers(ranked_TR: torch.Tensor, keep_TR: torch.Tensor, eps: float) -> torch.Tensor:
    """SparseMixer multipliers of the kept ranks (0 elsewhere), from ranked logits.

    Pick i's pool: every logit j not picked before it (kept and of a lower rank) whose relative
    distance (l_i - l_j) / max(|l_j|, l_i) is at most 2·eps; its multiplier is its softmax
    share in that pool, 1 / Σ_pool exp(l_j - l_i). All picks at once over (pick i, candidate j)
    pairs — T × R × R, tiny for the R ≤ 9 dynamic experts here — instead of R sequential rounds.
    """
    l_Ti1 = ranked_TR[:, :, None]
    l_T1j = ranked_TR[:, None, :]
    diff_Tij = l_T1j - l_Ti1
    _, earlier_ij = _consts(ranked_TR.shape[-1], ranked_TR.device)
    # far: (l_i - l_j) / max(|l_j|, l_i) > 2·eps, multiplied out (the max is ≥ 0; a 0/0 there,
    # at zero logits, is "near" in both forms).
    far_Tij = diff_Tij < torch.maximum(l_T1j.abs(), l_Ti1).mul_(-2 * eps)
    out_Tij = far_Tij | (keep_TR[:, None, :] & earlier_ij)
    # i is in its own pool (term 1), so the sum is ≥ 1; a far higher logit overflows to inf
    # and the share to 0.
    share_TR = diff_Tij.exp().masked_fill(out_Tij, 0.0).sum(dim=-1).reciprocal()
    return torch.where(keep_TR, share_TR, 0.0)


def sparsemixer_multipliers(logits_TR: torch.Tensor, mask_TR: torch.Tensor, eps: float) -> torch.Tensor:
    """The released checkpoint's per-pick multipliers (SparseMixer-style), in expert order.

    Chosen experts are taken one at a time by highest remaining logit (ties: lower index
    first). Each pick's multiplier is its softmax share among the not-yet-picked logits whose
    relative distance to it, (l_pick - l) / max(|l|, l_pick), is at most 2·eps (SparseMixer's
    rule, verbatim) — about 1 unless there are near-ties. `mask_TR` may leave holes in the
    logit order (a capacity drop): a higher, unchosen logit stays in every pick's pool.
    """
    ranked = _ranked(logits_TR)
    keep_TR = mask_TR.gather(-1, ranked.indices)
    return _unsort(_ranked_multipliers(ranked.values, keep_TR, eps), ranked.indices)


def _ranked_released(
    ranked_TR: torch.Tensor, keep_TR: torch.Tensor, shared_TS: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`released_weights` on ranked dynamic logits: (ranked weights_TR, shared_weights_TS)."""
    mult_TR = _ranked_multipliers(ranked_TR, keep_TR, eps)
    # A token whose every pick a capacity limit dropped has no multipliers: weight 0, not 0/0.
    mult_TR = mult_TR / mult_TR.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mult_TR.dtype).tiny)
    visible_TE = torch.cat([torch.where(keep_TR, ranked_TR, NEG_INF), shared_TS], dim=-1).softmax(dim=-1)
    num_dynamic = ranked_TR.shape[-1]
    dynamic_share_T1 = visible_TE[:, :num_dynamic].sum(dim=-1, keepdim=True)
    return mult_TR * dynamic_share_T1, visible_TE[:, num_dynamic:]


def released_weights(logits_TE: torch.Tensor, mask_TR: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine weights of the released checkpoint.

    Routed: sparsemixer multipliers renormalised to sum 1 (≈ 1/k each), scaled by the summed
    dynamic part of a softmax over the full logits masked to {chosen dynamic} ∪ {shared}.
    Shared: each shared expert's own entry of that softmax.
    Returns (weights_TR, shared_weights_TS).
    """
    num_dynamic = mask_TR.shape[-1]
    ranked = _ranked(logits_TE[:, :num_dynamic])
    weights_TR, shared_TS = _ranked_released(
        ranked.values, mask_TR.gather(-1, ranked.indices), logits_TE[:, num_dynamic:], eps
    )
    return _unsort(weights_TR, ranked.indices), shared_TS


class _SparseMixerGrad(torch.autograd.Function):
    """One SparseMixer pick's multiplier with the released training gradient.

    Forward: m · c, where m = g_s is the selected expert's share of the masked softmax g and c
    the 1 or 1/3 factor. Backward (the released rule, which ignores c): the upstream gradient
    times m, spread over the scores as the softmax's: dL/dscores = G · (onehot_s − g), with
    G = dL/dout · m. Masked-out scores have g = 0 and get no gradient but the one-hot's.
    """

    @staticmethod
    def forward(ctx, scores_TR, mult_T1, sel_T1, gates_TR, factor_T1):
        ctx.save_for_backward(mult_T1, sel_T1, gates_TR)
        return mult_T1 * factor_T1

    @staticmethod
    def backward(ctx, grad_T1):
        mult_T1, sel_T1, gates_TR = ctx.saved_tensors
        g_T1 = grad_T1 * mult_T1
        grad_TR = (gates_TR * -g_T1).scatter_add(-1, sel_T1, g_T1)
        return grad_TR, None, None, None, None


def sparsemixer_train_picks(
    logits_TR: torch.Tensor,
    k_T: torch.Tensor,
    eps: float,
    *,
    gumbel_TkR: torch.Tensor | None = None,
    coin_Tk: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released training-time selection when `ignore_differentiable_router` is false
    (SparseMixer): k_T experts per token, picked one at a time.

    Pick j: among the experts not picked yet, mask those whose relative gap to the remaining
    maximum, (max − l) / max(|l|, |max|), exceeds 2·eps; pick the argmax of the masked logits
    plus Gumbel noise; its multiplier is its share g_s of the masked softmax, times 1 when the
    pick is the unperturbed argmax (or with probability 1/4 otherwise) and 1/3 else; the
    gradient is `_SparseMixerGrad`'s. Tokens with fewer picks than j skip pick j.

    gumbel_TkR / coin_Tk: the noise (Gumbel(0, 1) and uniform [0, 1)) per pick, drawn from
    torch's generator when None (tests pass their own). Returns (mult_TR multipliers in expert
    order, 0 where not picked; mask_TR picked experts).
    """
    T, R = logits_TR.shape
    k_max = int(k_T.max()) if T else 0
    if gumbel_TkR is None:
        u = torch.rand(T, k_max, R, device=logits_TR.device, dtype=torch.float32)
        gumbel_TkR = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    if coin_Tk is None:
        coin_Tk = torch.rand(T, k_max, device=logits_TR.device)
    remaining_TR = logits_TR.detach().clone()
    mult_TR = logits_TR.new_zeros(T, R)
    mask_TR = torch.zeros(T, R, dtype=torch.bool, device=logits_TR.device)
    for j in range(k_max):
        active_T1 = (k_T > j)[:, None]
        with torch.no_grad():
            top_T1, argmax_T1 = remaining_TR.max(dim=-1, keepdim=True)
            scale_TR = logits_TR.detach().abs().clamp(min=top_T1.abs())
            far_TR = (top_T1 - logits_TR.detach()) / scale_TR > 2 * eps
            masked_TR = remaining_TR.masked_fill(far_TR, NEG_INF)
            sel_T1 = (masked_TR + gumbel_TkR[:, j].to(masked_TR.dtype)).argmax(dim=-1, keepdim=True)
            gates_TR = masked_TR.softmax(dim=-1)
            share_T1 = gates_TR.gather(-1, sel_T1)
            one_T1 = (sel_T1 == argmax_T1) | (coin_Tk[:, j : j + 1] > 0.75)
            factor_T1 = torch.where(one_T1, torch.ones_like(share_T1), torch.full_like(share_T1, 1 / 3))
        m_T1 = _SparseMixerGrad.apply(logits_TR, share_T1, sel_T1, gates_TR, factor_T1)
        m_T1 = torch.where(active_T1, m_T1, 0.0)
        pick_TR = torch.zeros_like(mask_TR).scatter(-1, sel_T1, True) & active_T1
        mult_TR = mult_TR + pick_TR * m_T1
        mask_TR |= pick_TR
        remaining_TR = remaining_TR.masked_fill(pick_TR, NEG_INF)
    return mult_TR, mask_TR


def capacity(num_tokens: int, num_dynamic: int, capacity_factor: float, min_capacity: int) -> int:
    """Tokens one expert may take per step when token dropping is on (DeepSpeed's rule)."""
    return max(min_capacity, math.ceil(num_tokens / num_dynamic * capacity_factor))


def drop_over_capacity(mask_TR: torch.Tensor, weights_TR: torch.Tensor, cap: int) -> torch.Tensor:
    """Keep at most `cap` tokens per expert, those with the highest routing weight
    (drop policy "probs"). Returns the reduced mask."""
    if cap >= mask_TR.shape[0]:
        return mask_TR
    score_TR = torch.where(mask_TR, weights_TR, -1.0)
    keep_idx_CR = score_TR.topk(cap, dim=0).indices
    keep_TR = torch.zeros_like(mask_TR).scatter(0, keep_idx_CR, True)
    return mask_TR & keep_TR


def load_balancing_loss(
    probs_TR: torch.Tensor, mask_TR: torch.Tensor, valid_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Aux loss over routed + null experts: R · Σ_e f_e · P_e.

    f_e: fraction of tokens that selected e; P_e: mean masked-softmax weight of e (the
    selected probabilities renormalised, paper eq. 3). `valid_T` excludes padding tokens.
    """
    num_dynamic = probs_TR.shape[-1]
    weights_TR = paper_weights(probs_TR, mask_TR)
    chosen_TR = mask_TR.to(probs_TR.dtype)
    if valid_T is not None:
        v_T1 = valid_T.to(probs_TR.dtype)[:, None]
        denom = v_T1.sum().clamp_min(1.0)
        f_R = (chosen_TR * v_T1).sum(0) / denom
        p_R = (weights_TR * v_T1).sum(0) / denom
    else:
        f_R = chosen_TR.mean(0)
        p_R = weights_TR.mean(0)
    return num_dynamic * (f_R * p_R).sum()


def jitter(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Multiplicative uniform noise in [1 - eps, 1 + eps] (training only)."""
    if eps <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def route(
    logits_TE: torch.Tensor,
    *,
    num_dynamic: int,
    mode: str,
    top_p: float,
    top_k: int,
    weighting: str,
    sparsemixer_eps: float,
    token_capacity: int | None = None,
    valid_T: torch.Tensor | None = None,
    differentiable: bool = False,
) -> Routing:
    """Select experts and combine weights from router logits. The softmax, the Top-P cumsum
    and the weights are computed in the logits' dtype (bf16 at inference, as released).
    Under torch.inference_mode the aux loss is not computed (Routing.aux_loss is 0).

    differentiable: the released training path with `ignore_differentiable_router: false`
    (weighting "released" only): k from Top-P as always, the k experts picked by
    `sparsemixer_train_picks` (Gumbel-perturbed, the 1/3-1 factor, its custom backward)."""
    logits_TR = logits_TE[:, :num_dynamic]
    probs_TR = logits_TR.softmax(dim=-1)
    ranked = _ranked(logits_TR)  # experts in the order the released code picks them
    if mode == "top_p":
        keep_TR = _top_p_keep(probs_TR.gather(-1, ranked.indices), top_p)
    elif mode == "top_k":
        keep_TR = _top_k_keep(logits_TR, top_k)
    else:
        raise ValueError(f"route(): mode {mode!r} has no router; use 'top_p' or 'top_k'")
    if differentiable:
        if weighting != "released":
            raise ValueError("route(): the differentiable (SparseMixer) router needs weighting 'released'")
        return _route_sparsemixer(
            logits_TE, probs_TR, keep_TR.sum(dim=-1), num_dynamic, sparsemixer_eps, token_capacity, valid_T
        )
    mask_TR = _unsort(keep_TR, ranked.indices)
    # Under torch.inference_mode nothing trains: the aux loss (14 small ops) is a zero there.
    aux = (
        logits_TE.new_zeros(())
        if torch.is_inference_mode_enabled()
        else load_balancing_loss(probs_TR, mask_TR, valid_T)
    )
    if token_capacity is not None:
        mask_TR = drop_over_capacity(mask_TR, paper_weights(probs_TR, mask_TR), token_capacity)
        keep_TR = mask_TR.gather(-1, ranked.indices)
    if weighting == "paper":
        weights_TR = paper_weights(probs_TR, mask_TR)
        shared_TS = torch.ones_like(logits_TE[:, num_dynamic:])
    elif weighting == "released":
        ranked_w_TR, shared_TS = _ranked_released(ranked.values, keep_TR, logits_TE[:, num_dynamic:], sparsemixer_eps)
        weights_TR = _unsort(ranked_w_TR, ranked.indices)
    else:
        raise ValueError(f"route(): weighting {weighting!r}; use 'paper' or 'released'")
    return Routing(
        mask_TR=mask_TR, weights_TR=weights_TR, shared_weights_TS=shared_TS, k_T=keep_TR.sum(dim=-1), aux_loss=aux
    )


def _route_sparsemixer(
    logits_TE: torch.Tensor,
    probs_TR: torch.Tensor,
    k_T: torch.Tensor,
    num_dynamic: int,
    eps: float,
    token_capacity: int | None,
    valid_T: torch.Tensor | None,
) -> Routing:
    """`route` in the released differentiable training mode: picks and multipliers from
    `sparsemixer_train_picks`, then the released combine (multipliers renormalised, scaled by
    the dynamic share of the masked full softmax; shared experts their own entries)."""
    logits_TR = logits_TE[:, :num_dynamic]
    mult_TR, mask_TR = sparsemixer_train_picks(logits_TR, k_T, eps)
    aux = load_balancing_loss(probs_TR, mask_TR, valid_T)
    if token_capacity is not None:
        mask_TR = drop_over_capacity(mask_TR, paper_weights(probs_TR, mask_TR), token_capacity)
        mult_TR = mult_TR * mask_TR
    mult_TR = mult_TR / mult_TR.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mult_TR.dtype).tiny)
    visible_TE = torch.cat([logits_TR.masked_fill(~mask_TR, NEG_INF), logits_TE[:, num_dynamic:]], dim=-1).softmax(-1)
    weights_TR = mult_TR * visible_TE[:, :num_dynamic].sum(dim=-1, keepdim=True)
    return Routing(
        mask_TR=mask_TR,
        weights_TR=weights_TR,
        shared_weights_TS=visible_TE[:, num_dynamic:],
        k_T=mask_TR.sum(dim=-1),
        aux_loss=aux,
    )
