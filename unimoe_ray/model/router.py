"""DCMoE router math (DESIGN.md §1; paper eq. 1-3): Top-P / Top-K selection, combine weights
in the paper's and the released checkpoint's form, capacity limit, aux load-balancing loss.

Pure functions of router logits; no parameters, no dispatch, no Ray.

Shape legend: T tokens, E all experts (routed + null + shared), R dynamic experts
(routed + null: the ones Top-P chooses among), S shared experts.
Router columns are ordered [routed..., null..., shared...].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    sorted_TR = probs_TR.sort(dim=-1, descending=True).values
    k_T1 = (sorted_TR.cumsum(dim=-1) < p).sum(dim=-1, keepdim=True) + 1
    return _first_k(probs_TR if order_TR is None else order_TR, k_T1)


def top_k_mask(probs_TR: torch.Tensor, k: int, *, order_TR: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-k selection (the paper's Unify-MoE ablation), ranked as in `top_p_mask`."""
    k_T1 = torch.full_like(probs_TR[:, :1], k, dtype=torch.long)
    return _first_k(probs_TR if order_TR is None else order_TR, k_T1)


def _first_k(scores_TR: torch.Tensor, k_T1: torch.Tensor) -> torch.Tensor:
    """mask of each token's k_T1 highest scores, lower index first among equals."""
    order_TR = scores_TR.sort(dim=-1, descending=True, stable=True).indices
    rank_R = torch.arange(scores_TR.shape[-1], device=scores_TR.device)
    keep_sorted_TR = rank_R < k_T1
    return torch.zeros_like(keep_sorted_TR).scatter(-1, order_TR, keep_sorted_TR)


def paper_weights(probs_TR: torch.Tensor, mask_TR: torch.Tensor) -> torch.Tensor:
    """Paper eq. 3: selected probabilities renormalised to sum 1 per token."""
    w_TR = probs_TR * mask_TR
    return w_TR / w_TR.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w_TR.dtype).tiny)


def sparsemixer_multipliers(
    logits_TR: torch.Tensor, mask_TR: torch.Tensor, eps: float
) -> torch.Tensor:
    """The released checkpoint's per-pick multipliers (SparseMixer-style).

    Chosen experts are taken one at a time by highest remaining logit (ties: lower index
    first). Each pick's multiplier is its softmax share among the not-yet-picked logits whose
    relative distance to it, (l_pick - l) / max(|l|, l_pick), is at most 2·eps (SparseMixer's
    rule, verbatim) — about 1 unless there are near-ties.

    Computed for all picks at once over (pick i, candidate j) pairs — T × R × R, tiny for the
    R ≤ 9 dynamic experts here — instead of R sequential rounds: at decode sizes the rounds
    were most of the router's time.
    """
    l_Ti1 = logits_TR[:, :, None]
    l_T1j = logits_TR[:, None, :]
    diff_Tij = l_T1j - l_Ti1
    idx_R = torch.arange(logits_TR.shape[-1], device=logits_TR.device)
    # Chosen j is picked before i when its logit is higher, or equal with a lower index.
    lower_ij = idx_R[None, :] < idx_R[:, None]
    before_Tij = (diff_Tij > 0) | ((diff_Tij == 0) & lower_ij)
    # far: (l_i - l_j) / max(|l_j|, l_i) > 2·eps, multiplied out (the max is ≥ 0; a 0/0 there,
    # at zero logits, is "near" in both forms).
    far_Tij = diff_Tij < torch.maximum(l_T1j.abs(), l_Ti1).mul_(-2 * eps)
    out_Tij = (mask_TR[:, None, :] & before_Tij) | far_Tij
    # share_i = exp(l_i) / Σ_pool exp(l_j) = 1 / Σ_pool exp(l_j - l_i): i is in its own pool
    # (term 1), so the sum is ≥ 1; a far higher logit overflows to inf and the share to 0.
    share_TR = diff_Tij.exp().masked_fill(out_Tij, 0.0).sum(dim=-1).reciprocal()
    return torch.where(mask_TR, share_TR, 0.0)


def released_weights(
    logits_TE: torch.Tensor, mask_TR: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine weights of the released checkpoint.

    Routed: sparsemixer multipliers renormalised to sum 1 (≈ 1/k each), scaled by the summed
    dynamic part of a softmax over the full logits masked to {chosen dynamic} ∪ {shared}.
    Shared: each shared expert's own entry of that softmax.
    Returns (weights_TR, shared_weights_TS).
    """
    num_dynamic = mask_TR.shape[-1]
    logits_TR = logits_TE[:, :num_dynamic]
    mult_TR = sparsemixer_multipliers(logits_TR, mask_TR, eps)
    mult_TR = mult_TR / mult_TR.sum(dim=-1, keepdim=True)
    shared_visible_TS = torch.ones_like(logits_TE[:, num_dynamic:], dtype=torch.bool)
    visible_TE = torch.cat([mask_TR, shared_visible_TS], dim=-1)
    full_TE = logits_TE.masked_fill(~visible_TE, NEG_INF).softmax(dim=-1)
    dynamic_share_T1 = full_TE[:, :num_dynamic].sum(dim=-1, keepdim=True)
    return mult_TR * dynamic_share_T1, full_TE[:, num_dynamic:]


def capacity(num_tokens: int, num_dynamic: int, capacity_factor: float, min_capacity: int) -> int:
    """Tokens one expert may take per step when token dropping is on (DeepSpeed's rule)."""
    return max(min_capacity, math.ceil(num_tokens / num_dynamic * capacity_factor))


def drop_over_capacity(
    mask_TR: torch.Tensor, weights_TR: torch.Tensor, cap: int
) -> torch.Tensor:
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
) -> Routing:
    """Select experts and combine weights from router logits. The softmax, the Top-P cumsum
    and the weights are computed in the logits' dtype (bf16 at inference, as released).
    Under torch.inference_mode the aux loss is not computed (Routing.aux_loss is 0)."""
    logits_TR = logits_TE[:, :num_dynamic]
    probs_TR = logits_TR.softmax(dim=-1)
    if mode == "top_p":
        mask_TR = top_p_mask(probs_TR, top_p, order_TR=logits_TR)
    elif mode == "top_k":
        mask_TR = top_k_mask(probs_TR, top_k, order_TR=logits_TR)
    else:
        raise ValueError(f"route(): mode {mode!r} has no router; use 'top_p' or 'top_k'")
    # Under torch.inference_mode nothing trains: the aux loss (14 small ops) is a zero there.
    aux = (logits_TE.new_zeros(()) if torch.is_inference_mode_enabled()
           else load_balancing_loss(probs_TR, mask_TR, valid_T))
    if token_capacity is not None:
        mask_TR = drop_over_capacity(mask_TR, paper_weights(probs_TR, mask_TR), token_capacity)
    if weighting == "paper":
        weights_TR = paper_weights(probs_TR, mask_TR)
        shared_TS = torch.ones_like(logits_TE[:, num_dynamic:])
    elif weighting == "released":
        weights_TR, shared_TS = released_weights(logits_TE, mask_TR, sparsemixer_eps)
    else:
        raise ValueError(f"route(): weighting {weighting!r}; use 'paper' or 'released'")
    return Routing(
        mask_TR=mask_TR,
        weights_TR=weights_TR,
        shared_weights_TS=shared_TS,
        k_T=mask_TR.sum(dim=-1),
        aux_loss=aux,
    )
