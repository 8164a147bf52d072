"""Router math against hand-computed values (docs/DESIGN.md §1, paper eq. 1-3)."""

import math

import pytest
import torch

from unimoe_ray.model import router


def test_top_p_k_per_token_for_known_probabilities():
    probs = torch.tensor(
        [
            [0.50, 0.30, 0.10, 0.10],  # cumsum 0.5 < 0.7, 0.8 ≥ 0.7 → k = 2
            [0.80, 0.10, 0.05, 0.05],  # the top expert alone reaches p → k = 1
            [0.25, 0.25, 0.25, 0.25],  # 0.25, 0.5 < 0.7 → k = 3
            [0.10, 0.60, 0.20, 0.10],  # sorted 0.6, 0.2: 0.6 < 0.7 → k = 2 (experts 1 and 2)
        ]
    )
    mask = router.top_p_mask(probs, 0.7)
    assert mask.sum(-1).tolist() == [2, 1, 3, 2]
    assert mask[3].tolist() == [False, True, True, False]
    assert mask[0].tolist() == [True, True, False, False]


def test_top_p_always_keeps_one_and_p_one_keeps_all_but_a_zero_tail():
    probs = torch.tensor([[0.999, 0.001, 0.0], [0.4, 0.35, 0.25]])
    assert router.top_p_mask(probs, 1e-6).sum(-1).tolist() == [1, 1]
    assert router.top_p_mask(probs, 1.0)[1].all()


def test_paper_weights_renormalise_selected_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    mask = torch.tensor([[True, True, False, False]])
    w = router.paper_weights(probs, mask)
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_released_weights_hand_computed():
    # Dynamic logits [2, 1, -1] (last = null), one shared expert with logit 0.5; experts 0, 1 chosen.
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    mask = torch.tensor([[True, True, False]])
    routed, shared = router.released_weights(logits, mask, eps=0.01)
    # No near-ties → multipliers 1, 1 → renormalised 1/2 each; scaled by the dynamic share of
    # softmax([2, 1, 0.5]) over {chosen} ∪ {shared}.
    z = math.exp(2) + math.exp(1) + math.exp(0.5)
    dyn = (math.exp(2) + math.exp(1)) / z
    torch.testing.assert_close(routed, torch.tensor([[dyn / 2, dyn / 2, 0.0]]))
    torch.testing.assert_close(shared, torch.tensor([[math.exp(0.5) / z]]))
    assert routed.sum() + shared.sum() == pytest.approx(1.0)


def test_sparsemixer_near_tie_shares_the_first_pick():
    # Logits 1.0 and 0.995 are within 2·eps (relative 0.005 < 0.02): the first pick's multiplier
    # is its softmax share between the two; the second pick stands alone (multiplier 1).
    logits = torch.tensor([[1.0, 0.995, -3.0]])
    mask = torch.tensor([[True, True, False]])
    mult = router.sparsemixer_multipliers(logits, mask, eps=0.01)
    first = math.exp(1.0) / (math.exp(1.0) + math.exp(0.995))
    torch.testing.assert_close(mult, torch.tensor([[first, 1.0, 0.0]]))


def _sparsemixer_one_token(logits, mask, eps):
    """Per-token reference of the released multipliers, written as plain Python."""
    logits, chosen = logits.tolist(), [i for i, m in enumerate(mask.tolist()) if m]
    mult, picked = [0.0] * len(logits), set()
    for _ in chosen:
        top_i = max((i for i in chosen if i not in picked), key=lambda i: logits[i])
        top = logits[top_i]
        near = [
            i
            for i in range(len(logits))
            if i not in picked and not (top - logits[i]) / max(abs(logits[i]), top) > 2 * eps
        ]
        z = sum(math.exp(logits[i]) for i in near)
        mult[top_i] = math.exp(top) / z
        picked.add(top_i)
    return mult


def test_sparsemixer_batched_matches_per_token_reference_with_mixed_k():
    # Tokens with fewer picks than the batch's largest k must keep their own multipliers
    # (regression: a finished token used to have column 0 overwritten with 0).
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 5, generator=gen)
    logits[::7, 1] = logits[::7, 0] * 0.999  # some near-ties
    k = torch.randint(1, 6, (64,), generator=gen)
    order = logits.argsort(dim=-1, descending=True)
    mask = torch.zeros(64, 5, dtype=torch.bool).scatter(-1, order, torch.arange(5) < k[:, None])
    # Non-prefix choices too (what a capacity drop leaves): a higher, unchosen logit stays a
    # candidate of every pick.
    holes = torch.rand(64, 5, generator=gen) < 0.3
    holes[:, 0] = False
    for m in (mask, mask & ~holes.gather(-1, order.argsort(-1))):
        mult = router.sparsemixer_multipliers(logits, m, eps=0.01)
        ref = torch.tensor([_sparsemixer_one_token(lg, mm, 0.01) for lg, mm in zip(logits, m)])
        torch.testing.assert_close(mult, ref)


def test_released_weights_finite_when_one_token_picks_only_expert_zero():
    # 1 routed + 1 null expert, tied zero logits (a zero-initialised router): token 0 picks both,
    # token 1 only expert 0. Used to give 0/0 = NaN for token 1.
    logits = torch.zeros(2, 4)
    mask = torch.tensor([[True, True], [True, False]])
    routed, shared = router.released_weights(logits, mask, eps=0.01)
    assert torch.isfinite(routed).all() and torch.isfinite(shared).all()
    torch.testing.assert_close(routed.sum(-1) + shared.sum(-1), torch.ones(2))
    assert routed[1, 0] > 0 and routed[1, 1] == 0


def test_aux_loss_on_a_known_mask():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    # f = [0.5, 1, 0]; P = mean of renormalised weights = [1/3, 2/3, 0] → 3·(0.5/3 + 2/3) = 2.5
    assert router.load_balancing_loss(probs, mask).item() == pytest.approx(2.5)
    valid = torch.tensor([True, False])  # padding excluded: f = [1,1,0], P = [2/3,1/3,0] → 3
    assert router.load_balancing_loss(probs, mask, valid).item() == pytest.approx(3.0)


def test_capacity_drops_lowest_weight_tokens():
    mask = torch.ones(4, 2, dtype=torch.bool)
    weights = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    kept = router.drop_over_capacity(mask, weights, cap=2)
    assert kept[:, 0].tolist() == [True, False, True, False]
    assert kept[:, 1].tolist() == [False, True, False, True]
    assert router.capacity(1000, 9, 6.0, 8) == math.ceil(1000 / 9 * 6.0)
    assert router.capacity(4, 9, 6.0, 8) == 8


def test_route_top_k_mode_picks_k():
    logits = torch.randn(16, 7)
    r = router.route(logits, num_dynamic=5, mode="top_k", top_p=0.7, top_k=2, weighting="paper", sparsemixer_eps=0.01)
    assert r.k_T.tolist() == [2] * 16
    torch.testing.assert_close(r.weights_TR.sum(-1), torch.ones(16))
    assert r.shared_weights_TS.shape == (16, 2)


def test_selection_follows_logit_order_with_lower_index_first_on_ties():
    # Equal probabilities (as distinct bf16 logits can round to), distinct logits: the higher
    # logit is picked, as the released code picks by max logit.
    probs = torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2)
    logits = torch.tensor([[0.0, 0.001, -0.4, -0.4], [0.001, 0.0, -0.4, -0.4]])
    mask = router.top_p_mask(probs, 0.25, order_TR=logits)
    assert mask.tolist() == [[False, True, False, False], [True, False, False, False]]
    # Exact ties in the logits: the lower index first (k = 3 of 4 tied → 0, 1, 2).
    flat = torch.zeros(1, 4)
    assert router.top_p_mask(flat.softmax(-1), 0.6, order_TR=flat).tolist() == [[True, True, True, False]]
    assert router.top_k_mask(flat.softmax(-1), 1, order_TR=flat).tolist() == [[True, False, False, False]]


def test_bf16_routing_picks_the_experts_the_released_rule_picks():
    """Many bf16 rows with near-equal logits: selection must equal a per-token reference that
    takes the k highest logits (lower index first), k from the bf16 probability cumsum."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(512, 5, generator=g) * 0.02).to(torch.bfloat16)
    r = router.route(
        logits, num_dynamic=5, mode="top_p", top_p=0.7, top_k=2, weighting="released", sparsemixer_eps=0.01
    )
    probs = logits.softmax(-1)
    for t in range(logits.shape[0]):
        k = int((probs[t].sort(descending=True).values.cumsum(-1) < 0.7).sum()) + 1
        order = sorted(range(5), key=lambda e: (-float(logits[t, e]), e))
        assert sorted(order[:k]) == r.mask_TR[t].nonzero().flatten().tolist(), t


# ---- the released training path with ignore_differentiable_router=false (SparseMixer) ----


def _sparsemixer_by_hand(scores, k, eps, gumbel, coin, upstream):
    """The released rule written out one token and one pick at a time, in plain Python floats:
    (multipliers, picked, dL/dscores) for the loss Σ_j upstream[j] · multiplier_j."""
    import math

    R = len(scores)
    remaining = list(scores)
    mults, picks, grad = [], [], [0.0] * R
    for j in range(k):
        top = max(remaining)
        argmax = remaining.index(top)
        masked = [
            -math.inf
            if remaining[r] == -math.inf or (top - scores[r]) / max(abs(scores[r]), abs(top)) > 2 * eps
            else remaining[r]
            for r in range(R)
        ]
        noisy = [m + g for m, g in zip(masked, gumbel[j])]
        sel = noisy.index(max(noisy))
        z = sum(math.exp(m - top) for m in masked if m > -math.inf)
        gates = [math.exp(m - top) / z if m > -math.inf else 0.0 for m in masked]
        factor = 1.0 if (sel == argmax or coin[j] > 0.75) else 1 / 3
        mults.append(gates[sel] * factor)
        picks.append(sel)
        big_g = upstream[j] * gates[sel]  # the backward multiplies by g_s, not by the factor
        for r in range(R):
            grad[r] += big_g * ((1.0 if r == sel else 0.0) - gates[r])
        remaining[sel] = -math.inf
    return mults, picks, grad


def test_sparsemixer_training_picks_and_backward_follow_the_released_rule():
    eps = 0.05
    # Token 0 has near-ties (three logits within 2·eps relative), token 1 one clear winner
    # and a close second, token 2 takes one pick only.
    scores = torch.tensor(
        [[2.00, 1.95, 1.92, 0.50], [3.00, -1.00, 2.90, 0.10], [0.30, 0.31, -2.0, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    k_T = torch.tensor([3, 2, 1])
    g = torch.Generator().manual_seed(3)
    gumbel = -torch.log(-torch.log(torch.rand(3, 3, 4, generator=g, dtype=torch.float64)))
    coin = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.8, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    mult_TR, mask_TR = router.sparsemixer_train_picks(scores, k_T, eps, gumbel_TkR=gumbel, coin_Tk=coin)
    upstream_TR = torch.tensor(
        [[0.3, -1.2, 0.7, 2.0], [1.5, 0.4, -0.6, 0.2], [-0.8, 1.1, 0.3, 0.9]], dtype=torch.float64
    )
    (mult_TR * upstream_TR).sum().backward()
    for t in range(3):
        picks_seen = []
        k = int(k_T[t])
        # upstream of pick j is the upstream of the expert it picked (the multiplier sits there)
        mults, picks, _ = _sparsemixer_by_hand(
            scores[t].tolist(), k, eps, gumbel[t].tolist(), coin[t].tolist(), [0.0] * k
        )
        up = [float(upstream_TR[t, p]) for p in picks]
        _, _, grad = _sparsemixer_by_hand(scores[t].tolist(), k, eps, gumbel[t].tolist(), coin[t].tolist(), up)
        for m, p in zip(mults, picks):
            assert float(mult_TR[t, p].detach()) == pytest.approx(m, rel=1e-12)
            picks_seen.append(p)
        assert sorted(picks_seen) == mask_TR[t].nonzero().flatten().tolist()
        assert scores.grad[t].tolist() == pytest.approx(grad, rel=1e-10, abs=1e-12)
    # The near-tie token really exercised the perturbed pick and the 1/3 factor somewhere.
    assert mask_TR.sum().item() == 6


def test_differentiable_route_trains_the_router_through_the_picks():
    torch.manual_seed(0)
    logits_TE = torch.randn(16, 6, requires_grad=True)  # 4 dynamic + 2 shared
    r = router.route(
        logits_TE,
        num_dynamic=4,
        mode="top_p",
        top_p=0.7,
        top_k=2,
        weighting="released",
        sparsemixer_eps=0.01,
        differentiable=True,
    )
    assert torch.equal(r.k_T, r.mask_TR.sum(-1)) and bool((r.k_T >= 1).all())
    # Routed weights sum to the dynamic share; with the shared weights they sum to 1.
    total_T = r.weights_TR.sum(-1) + r.shared_weights_TS.sum(-1)
    assert torch.allclose(total_T, torch.ones(16), atol=1e-6)
    (r.weights_TR * torch.randn(16, 4)).sum().backward()
    assert logits_TE.grad[:, :4].abs().sum() > 0
    with pytest.raises(ValueError, match="released"):
        router.route(
            logits_TE,
            num_dynamic=4,
            mode="top_p",
            top_p=0.7,
            top_k=2,
            weighting="paper",
            sparsemixer_eps=0.01,
            differentiable=True,
        )
