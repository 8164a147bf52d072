"""Expert-parallel training (unimoe_ray.model.expert_parallel + unimoe_ray.train.expert_parallel)
equals the unsharded run: 2 processes over gloo, W=2 with N=2 (each rank holds 2 of the tiny
model's 4 routed experts; tokens travel by all_to_all) against W=2 with N=1 (DDP) and against
one process on the union of the batches (the two ranks' batches as 2 micro-batches of one
window). Aux loss and both jitters on, AdamW, clipping active: losses, grad norms, every
gradient and every parameter after 3 steps within 1e-5 relative, expert choice identical. Also
the capacity rule (token_drop), and a checkpoint written at N=2 resumed at N=1 (the optimizer
state follows each expert) giving the uninterrupted N=1 run's next loss.

Jitter draws random numbers on each rank: expert parallelism draws none of its own (routing,
jitter included, runs on each rank's own tokens before any exchange), so with the loop's
per-rank seeds N=2 and N=1 draw the same noise. The one-process reference keeps one RNG stream
per emulated rank and switches to micro-batch a's stream (rank a's seed) around its forward.
"""

from __future__ import annotations

import tempfile
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unimoe_ray.checkpoint import load_pretrained, save_pretrained
from unimoe_ray.model.expert_parallel import (
    ExpertElsewhere,
    ExpertParallelExperts,
    ExpertParallelGroups,
    make_groups,
    shard_experts,
)
from unimoe_ray.model.moe import DCMoE
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import PromptBuilder, config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.batches import ExampleBuilder, collate
from unimoe_ray.train.config import TrainConfigError, stage_config
from unimoe_ray.train.expert_parallel import (
    ExpertParallelBackend,
    exchange_metrics,
    optimizer_order,
    restore_optimizer,
    save_sharded_checkpoint,
)
from unimoe_ray.train.optim import TorchBackend
from unimoe_ray.train.state import load_train_state, save_train_state
from unimoe_ray.train.step import LossModule, train_step
from unimoe_ray.train.synthetic import synthetic_rows

SEED = 3
STEPS = 3
W = 2
AUX_WEIGHT = 0.05  # larger than the released 0.025 so the aux gradient is not lost in the CE's
# lr 1e-3 moves the weights visibly in 3 steps; grad_clip 1.0 is active (initial norms are ~10).
TRAIN = stage_config("stage3", lr=1e-3, warmup_steps=0, max_steps=10, grad_clip=1.0)
RTOL = 1e-5


def _examples(root: Path):
    """The tiny config (jitter on, the preset's 0.01) and 12 examples: step s, rank r takes
    examples [(s·W + r)·2, +2)."""
    tok = load_tokenizer(root / "tok")
    cfg = config_for_tokenizer(get_preset("tiny"), tok)
    build = ExampleBuilder(PromptBuilder(tok, cfg), cfg)
    rows = synthetic_rows("tts_en", 6, frames=(8, 30)) + synthetic_rows("t2m", 6, frames=(8, 30))
    rows = [rows[i // 2] if i % 2 == 0 else rows[6 + i // 2] for i in range(12)]  # mix the tasks
    return cfg, [build(r) for r in rows]


def _batch(cfg, ex, step: int, rank: int):
    return collate(ex[(step * W + rank) * 2 : (step * W + rank) * 2 + 2], cfg)


def _record_routing(model) -> list:
    """Every DCMoE forward's mask_TR, in call order."""
    masks: list = []
    for m in model.modules():
        if isinstance(m, DCMoE):
            m.register_forward_hook(lambda mod, args, out: masks.append(out[1].mask_TR.clone()))
    return masks


def _snapshot(named) -> dict:
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


def _run(
    root: Path,
    init: str,
    *,
    rank: int,
    groups: ExpertParallelGroups | None,
    single: bool = False,
    steps: int = STEPS,
    save_at: int | None = None,
    resume: Path | None = None,
    start: int = 0,
) -> dict:
    """Train `steps` steps from `init` (or resume from `resume` at step `start`) as the loop
    does: per-rank seed, lm_head frozen, sharded + ExpertParallelBackend when `groups`, DDP
    when 2 ranks without it, one process with both ranks' batches as micro-batches if `single`.
    `save_at`: write a checkpoint after that step (sharded: ckpt/, DDP: ckpt_plain/, as the loop)."""
    from torch.nn.parallel import DistributedDataParallel

    cfg, ex = _examples(root)
    model = load_pretrained(resume or init, dtype=torch.float32).train()
    torch.manual_seed(SEED * 1000 + rank)  # after building (its init draws): the streams start here
    model.lm_head.weight.requires_grad_(False)
    masks = _record_routing(model)
    lm = LossModule(model)
    order = optimizer_order(lm, TRAIN.weight_decay)  # the unsharded order (plain checkpoints)
    grads: list[dict] = []
    if groups is not None:
        shard_experts(model, groups)
        backend = ExpertParallelBackend(lm, TRAIN, groups)
        reduce = backend.reduce
        backend.reduce = lambda: (reduce(), grads.append(_snapshot(backend.named_params)))
    else:
        tc = TRAIN.replace(grad_accum=W) if single else TRAIN
        backend = TorchBackend(lm if single else DistributedDataParallel(lm, find_unused_parameters=True), tc)
        named = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
        step_fn = backend.step
        backend.step = lambda: (grads.append(_snapshot(named)), step_fn())[1]
    if resume is not None:
        state = load_train_state(resume)
        restore_optimizer(backend, state["backend"], resume, order)
        torch.set_rng_state(state["rng"][rank])
    if single:  # one RNG stream per emulated rank, micro-batch a on rank a's
        streams = []
        for r in range(W):
            torch.manual_seed(SEED * 1000 + r)
            streams.append(torch.get_rng_state())
        pos = {"a": 0}

        def enter(mod, args):
            torch.set_rng_state(streams[pos["a"]])

        def leave(mod, args, out):
            streams[pos["a"]] = torch.get_rng_state()
            pos["a"] = (pos["a"] + 1) % W

        lm.register_forward_pre_hook(enter)
        lm.register_forward_hook(leave)
    losses, norms, exchange = [], [], []
    for s in range(start, start + steps):
        micro = [_batch(cfg, ex, s, r) for r in range(W)] if single else [_batch(cfg, ex, s, rank)]
        res = train_step(backend, micro, aux_weight=AUX_WEIGHT)
        assert not res.skipped, res.cause
        losses.append(res.loss)
        norms.append(res.grad_norm)
        if groups is not None:
            exchange.append(exchange_metrics(model, groups))
        if save_at is not None and s + 1 == save_at:
            rngs = [None] * W
            dist.all_gather_object(rngs, torch.get_rng_state())
            if groups is not None:
                save_sharded_checkpoint(
                    backend, model, root / "ckpt", meta={"step": save_at}, rngs=rngs, max_shard_bytes=64 * 1024
                )
            elif rank == 0:  # what the loop's rank 0 writes without expert parallelism
                save_pretrained(model, root / "ckpt_plain")
                save_train_state(root / "ckpt_plain", {"backend": backend.state_dict(), "rng": rngs})
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(losses=losses, norms=norms, grads=grads, params=params, masks=masks, exchange=exchange)


def _worker(rank: int, root: Path, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    torch.set_num_threads(1)
    groups = make_groups(2)
    out = {
        "ddp": _run(root, root / "init", rank=rank, groups=None, save_at=2),
        "ep": _run(root, root / "init", rank=rank, groups=groups, save_at=2),
    }
    dist.barrier()  # every rank's part of the checkpoints is written
    out["resumed"] = _run(root, root / "init", rank=rank, groups=None, resume=root / "ckpt", start=2, steps=1)
    out["resharded"] = _run(root, root / "init", rank=rank, groups=groups, resume=root / "ckpt_plain", start=2, steps=1)
    out["ddp_drop"] = _run(root, root / "init_drop", rank=rank, groups=None)
    out["ep_drop"] = _run(root, root / "init_drop", rank=rank, groups=groups)
    torch.save(out, root / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_train")
    build_test_tokenizer(root / "tok")
    cfg, _ = _examples(root)
    torch.manual_seed(0)  # the vision tower's init
    model = UniMoEAudio(cfg).init_weights(seed=1)
    save_pretrained(model, root / "init")
    # The capacity rule on: at most ceil(T / 5 · 0.5) tokens per expert, so tokens drop.
    drop = UniMoEAudio(cfg.replace(moe=dict(token_drop=True, capacity_factor=0.5, min_capacity=1)))
    drop.load_state_dict(model.state_dict())
    save_pretrained(drop, root / "init_drop")
    init_file = tempfile.mktemp(dir=root)
    mp.spawn(_worker, args=(root, init_file), nprocs=W, join=True)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(W)]
    single = _run(root, root / "init", rank=0, groups=None, single=True)
    return dict(root=root, ranks=ranks, single=single, cfg=cfg)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_same(a: dict, b: dict, what: str, *, noise_only: tuple[str, ...] = ()) -> None:
    """Every tensor within RTOL; those named in `noise_only` within 10·RTOL (see
    `NEAR_ZERO_GRADIENT`)."""
    assert sorted(a) == sorted(b), what
    for n in b:
        tol = 10 * RTOL if n.endswith(noise_only) else RTOL
        assert _rel(a[n], b[n]) <= tol, f"{what}: {n} differs by {_rel(a[n], b[n]):.2e} relative"


# The key projection's bias reaches the logits as q·R_j·b (R_j: RoPE's rotation at key j); in
# the lowest-frequency RoPE dimensions R_j barely changes over these short rows, the softmax
# nearly cancels a term common to all keys, and those bias entries get gradients of ~1e-8 —
# AdamW's eps — whose rounding noise is a large part of them. AdamW divides by their own
# magnitude, so these entries take noise-dependent steps (~1e-5 of the tensor over 3 steps) in
# any two runs that sum in different orders. They are compared at 1e-4 (their gradients at
# 1e-5 like all others), every other parameter at 1e-5.
NEAR_ZERO_GRADIENT = ("self_attn.k_proj.bias",)


def _norm(grads: dict) -> float:
    return float(torch.stack([g.double().norm() for g in grads.values()]).norm())


def _union(dicts: list[dict]) -> dict:
    """The ranks' tensors by name; a name on several ranks must agree (replicated)."""
    out: dict = {}
    for d in dicts:
        for n, t in d.items():
            if n in out:
                assert _rel(t, out[n]) <= RTOL, f"replicated {n} differs between ranks"
            out[n] = t
    return out


@pytest.mark.parametrize("sharded,plain", [("ep", "ddp"), ("ep_drop", "ddp_drop")])
def test_sharded_training_equals_ddp(runs, sharded, plain):
    ranks = runs["ranks"]
    E = runs["cfg"].moe.num_routed
    for r in range(W):
        ep, ddp = ranks[r][sharded], ranks[r][plain]
        assert ep["losses"] == pytest.approx(ddp["losses"], rel=RTOL)
        # The sharded norm is summed in float64; torch's clip_grad_norm_ (DDP) sums each
        # tensor in float32, ~4e-5 off on the 394k-element codec head: compare with the exact
        # norm of DDP's gradients, and torch's within its own error.
        assert ep["norms"] == pytest.approx([_norm(g) for g in ranks[0][plain]["grads"]], rel=RTOL)
        assert ep["norms"] == pytest.approx(ddp["norms"], rel=1e-4)
        assert ddp["norms"][0] > TRAIN.grad_clip  # clipping was active
        assert len(ep["masks"]) == len(ddp["masks"]) == STEPS * runs["cfg"].num_layers
        for m_ep, m_ddp in zip(ep["masks"], ddp["masks"]):
            assert torch.equal(m_ep, m_ddp)  # the same experts for every token
        # Rank r holds experts [2r, 2r + 2) and nothing of the others.
        held = {n.split(".routed_experts.")[1].split(".")[0] for n in ep["params"] if ".routed_experts." in n}
        assert held == {str(k) for k in range(r * E // W, (r + 1) * E // W)}
    for s in range(STEPS):
        grads = ranks[0][plain]["grads"][s]
        _assert_same(_union([ranks[r][sharded]["grads"][s] for r in range(W)]), grads, f"step {s + 1} gradients")
    _assert_same(
        _union([ranks[r][sharded]["params"] for r in range(W)]),
        ranks[0][plain]["params"],
        f"parameters after {STEPS} steps",
        noise_only=NEAR_ZERO_GRADIENT,
    )


def test_sharded_training_equals_one_process_on_the_union(runs):
    ranks, single = runs["ranks"], runs["single"]
    assert ranks[0]["ep"]["losses"] == pytest.approx(single["losses"], rel=RTOL)
    assert ranks[0]["ep"]["norms"] == pytest.approx([_norm(g) for g in single["grads"]], rel=RTOL)
    # The single process's forwards alternate rank 0's and rank 1's micro-batch.
    L = runs["cfg"].num_layers
    for s in range(STEPS):
        for r in range(W):
            for y in range(L):
                assert torch.equal(single["masks"][(s * W + r) * L + y], ranks[r]["ep"]["masks"][s * L + y])
        _assert_same(
            _union([ranks[r]["ep"]["grads"][s] for r in range(W)]), single["grads"][s], f"step {s + 1} gradients"
        )
    _assert_same(
        _union([ranks[r]["ep"]["params"] for r in range(W)]),
        single["params"],
        "parameters",
        noise_only=NEAR_ZERO_GRADIENT,
    )
    assert single["losses"][-1] < single["losses"][0]  # it trains


def test_capacity_rule_drops_tokens(runs):
    """The drop run routed fewer assignments than the dropless one (the rule is in effect)."""
    dropless = sum(int(m[:, :4].sum()) for m in runs["ranks"][0]["ep"]["masks"])
    dropped = sum(int(m[:, :4].sum()) for m in runs["ranks"][0]["ep_drop"]["masks"])
    assert dropped < dropless


def test_checkpoint_at_n2_is_the_released_layout_and_resumes_at_n1(runs):
    root, ranks = runs["root"], runs["ranks"]
    # Each rank of the EP group wrote its experts' shard(s): the folder opens as one model,
    # equal to the N=2 run's weights after step 2 (= the DDP run's, as tested above).
    index = (root / "ckpt" / "model.safetensors.index.json").read_text()
    assert "deepspeed_experts.3.down_proj.weight" in index and "fixed_real_moe.1" in index
    assert len(list((root / "ckpt").glob("model-*-of-*.safetensors"))) > 2
    assert len(list((root / "ckpt").glob("optimizer-experts-*-of-00002.pt"))) == 2
    full = load_pretrained(root / "ckpt", dtype=torch.float32)
    assert not any(isinstance(m, ExpertElsewhere) for m in full.modules())
    # Resumed at N=1 (DDP) from step 2: step 3's loss is the uninterrupted N=1 run's.
    for r in range(W):
        assert ranks[r]["resumed"]["losses"][0] == pytest.approx(ranks[r]["ddp"]["losses"][2], rel=RTOL)
    _assert_same(
        ranks[0]["resumed"]["params"],
        ranks[0]["ddp"]["params"],
        "parameters after the resumed step",
        noise_only=NEAR_ZERO_GRADIENT,
    )


def test_plain_checkpoint_resumes_sharded(runs):
    """N=1 → N=2: the DDP run's step-2 checkpoint (integer-keyed optimizer state) resumed
    sharded gives its step 3."""
    ranks = runs["ranks"]
    for r in range(W):
        assert ranks[r]["resharded"]["losses"][0] == pytest.approx(ranks[r]["ddp"]["losses"][2], rel=RTOL)
    _assert_same(
        _union([ranks[r]["resharded"]["params"] for r in range(W)]),
        ranks[0]["ddp"]["params"],
        "parameters after the resharded step",
        noise_only=NEAR_ZERO_GRADIENT,
    )


def test_exchange_statistics_count_every_assignment(runs):
    ranks = runs["ranks"]
    E, L = runs["cfg"].moe.num_routed, runs["cfg"].num_layers
    for s in range(STEPS):
        m0 = ranks[0]["ep"]["exchange"][s]
        assert m0 == ranks[1]["ep"]["exchange"][s]  # every rank reports all ranks' numbers
        for r in range(W):
            masks = ranks[r]["ep"]["masks"][s * L : (s + 1) * L]
            sent_E = sum(m[:, :E].sum(0) for m in masks)
            assert [m0[f"ep/rank{r}/sent_e{e}"] for e in range(E)] == sent_E.tolist()
        received = [sum(m0[f"ep/rank{r}/received_e{e}"] for e in range(r * 2, r * 2 + 2)) for r in range(W)]
        assert received == [m0[f"ep/rank{r}/received"] for r in range(W)]
        assert sum(received) == sum(m0[f"ep/rank{r}/sent_e{e}"] for r in range(W) for e in range(E))
        assert m0["ep/imbalance"] == pytest.approx(max(received) / (sum(received) / W))
        assert all(m0[f"ep/L{y}/imbalance"] >= 1.0 for y in range(L))


# ---- without processes ----


def _groups(world: int, rank: int, ep_size: int) -> ExpertParallelGroups:
    """The layout without process groups (sharding itself does not communicate)."""
    start = rank - rank % ep_size
    return ExpertParallelGroups(
        world_size=world,
        rank=rank,
        ep_size=ep_size,
        ep_group=None,
        edp_group=None,
        ep_ranks=tuple(range(start, start + ep_size)),
        edp_ranks=tuple(range(rank % ep_size, world, ep_size)),
    )


def test_sharding_frees_the_other_ranks_experts(tiny_cfg):
    model = UniMoEAudio(tiny_cfg).init_weights(seed=0)
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for p in model.moe_layers[0].routed_experts[0].parameters())
    gone = weakref.ref(model.moe_layers[0].routed_experts[0].up_proj.weight)
    shard_experts(model, _groups(world=4, rank=3, ep_size=2))  # position 1: experts 2, 3
    assert gone() is None  # the memory is really released
    assert sum(p.numel() for p in model.parameters()) == total - 2 * tiny_cfg.num_layers * per_expert
    for moe in model.moe_layers:
        assert [type(e).__name__ for e in moe.routed_experts] == ["ExpertElsewhere"] * 2 + ["SwiGLU"] * 2
        assert isinstance(moe.expert_backend, ExpertParallelExperts)
    names = [n for n in model.state_dict() if ".routed_experts." in n]
    assert names and all(".routed_experts.2." in n or ".routed_experts.3." in n for n in names)
    with pytest.raises(RuntimeError, match="lives on expert-parallel rank 0"):
        model.moe_layers[0].routed_experts[0](torch.zeros(1, tiny_cfg.hidden_size))


def test_bad_expert_parallel_sizes_are_named(tiny_cfg):
    model = UniMoEAudio(tiny_cfg)
    with pytest.raises(ValueError, match="size 3 does not divide the 4 routed experts"):
        shard_experts(model, _groups(world=3, rank=0, ep_size=3))
    dense = UniMoEAudio(tiny_cfg.replace(moe=dict(mode="dense")))
    with pytest.raises(ValueError, match="needs a DCMoE model"):
        shard_experts(dense, _groups(world=2, rank=0, ep_size=2))
    tc = stage_config("stage3", expert_parallel=4)
    with pytest.raises(TrainConfigError, match="both the 2 workers .* and the 4 routed experts"):
        tc.check_expert_parallel(num_workers=2, num_routed=4)
    with pytest.raises(TrainConfigError, match="6 workers .* 4 routed experts"):
        tc.check_expert_parallel(num_workers=6, num_routed=4)
    tc.check_expert_parallel(num_workers=8, num_routed=8)
    with pytest.raises(TrainConfigError, match="dense"):
        tc.check_expert_parallel(num_workers=4, num_routed=None)
    with pytest.raises(TrainConfigError, match="expert_parallel=0"):
        stage_config("stage3", expert_parallel=0)
    with pytest.raises(TrainConfigError, match="DeepSpeed"):
        stage_config("stage3", expert_parallel=2, deepspeed_config={"zero_optimization": {"stage": 2}})


def test_stage_jobs_take_expert_parallel():
    import argparse

    from unimoe_ray.train.stages import add_common_args, train_config_from_args

    p = argparse.ArgumentParser()
    add_common_args(p, "stage3")
    args = p.parse_args(["--shards", "s", "--tokenizer", "t", "--out", "o", "--expert-parallel", "2"])
    assert train_config_from_args("stage3", args).expert_parallel == 2
