"""One guided decode step of the `small` model (issue 12): ms per step for fp32, bf16 and int8
experts side by side, against its memory roofline, and the real-time factor.

A step is what generation repeats per audio frame: the model on one new codec frame per row
(conditional + unconditional rows, KV cache), then guidance on fp32 logits and top-k sampling.
Batches of 1 and 8 requests (2 and 16 rows). The cache is rewound after each timed step, so
every step attends over the same `--prompt` positions.

- roof: bytes the step must read once (attention, norms, router, the codec head, the experts
  the step's routing touched in their stored dtype, the KV cache) ÷ the read bandwidth
  measured in the same round (`sum` over a 1 GiB buffer in huge pages).
- RTF (real-time factor): steady step time × 50 frames/s — seconds of compute per second of audio
  for every request in the batch (< 1: faster than real time).
- weights: every model's CPU weights sit in huge pages (`convert_experts` moves them,
  unimoe_ray.model.hugepages); `--small-pages` adds each expert dtype again with its weights
  left in ordinary 4 KiB pages (rows `fp32/4k`, ...), timed in the same rounds.
- `--breakdown`: where one step's time goes (forward hooks; adds some overhead).
- `--quality`: bf16/int8 against fp32 on the same weights: max / mean |logit error| of a
  prefill + decode forward, and greedy generation (`generate`, greedy) of `--frames` frames:
  agreement of the codes and the first frame that differs, plus teacher-forced top-1
  agreement (each step fed the fp32 model's codes). Random weights: near-uniform logits, so
  greedy choices are more fragile than a trained model's.

Timing: interleaved rounds (rotating order) in one process, medians; ratios are medians of
per-round ratios. In a round each model runs `--block` consecutive steps: "step" is the median
of all but the first (steady state, as generation runs: one step after another of one model),
"cold" the first (after the other models' steps and the 1 GiB read probe have evicted its
weights from the caches — what a step costs when something else ran in between). The machine (CPU, ISA, threads), the load average and each model's kernel
choice are printed with the figures.

    .venv/bin/python benchmarks/decode_step.py [--rounds 15] [--breakdown] [--quality] [--json out.json]

Shape legend: B rows, K codebooks, V codec vocab, C conditional rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from machine import machine_line, read_probe  # benchmarks/machine.py

from unimoe_ray.inference.generate import SamplingConfig, generate
from unimoe_ray.model import autotune, hugepages, kernel_cache, kernel_plans
from unimoe_ray.model.quantize import convert_experts
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompt import Prompt

FRAMES_PER_S = 50
DTYPES = ("fp32", "bf16", "int8")


class Stepper:
    """One model with its prefilled cache for `requests` guided requests."""

    def __init__(self, model: UniMoEAudio, requests: int, prompt_len: int, seed: int) -> None:
        cfg = model.cfg
        self.model, self.C, self.B = model, requests, 2 * requests
        gen = torch.Generator().manual_seed(seed)
        ids_BL = torch.randint(0, cfg.codec_placeholder_id, (self.B, prompt_len), generator=gen)
        self.cache = model.new_cache(self.B, prompt_len + 4)
        with torch.inference_mode():
            model(ids_BL, cache=self.cache, logits_last_only=True)
        self.next_ids_B1 = torch.full((self.B, 1), cfg.codec_placeholder_id)
        self.codes_BK1 = torch.randint(0, cfg.codebook_size, (self.B, cfg.codec_channels, 1), generator=gen)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.last = None

    def step(self) -> torch.Tensor:
        """One decode step (model + guidance + top-k sampling) on the last sampled frame; the cache
        is rewound after it (every step attends over the same positions)."""
        cache = self.cache
        length, next_pos = cache.length, cache.next_pos_B.clone()
        with torch.inference_mode():
            out = self.model(self.next_ids_B1, self.codes_BK1, cache=cache, logits_last_only=True)
            logits_BKV = out.codec_logits_BLKV[:, -1].float()
            cond = logits_BKV[: self.C]
            guided = cond + 3.0 * (cond - logits_BKV[self.C :])
            kth = guided.topk(45, dim=-1).values[..., -1:]
            probs = guided.masked_fill(guided < kth, float("-inf")).softmax(-1)
            frame = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=self.gen)
        cache.length, cache.next_pos_B = length, next_pos
        # The next step reads the frame just sampled (both rows of a request, as generation
        # feeds them), so routing — and the experts a step touches — changes from step to step.
        self.codes_BK1 = frame.view(self.C, -1, 1).repeat(2, 1, 1)
        self.last = out
        return frame


def step_bytes(model: UniMoEAudio, stepper: Stepper) -> int:
    """Bytes one step must read: every non-expert weight a decode step uses, the touched experts
    in their stored dtype, and the KV cache."""
    out = stepper.last
    total = 0
    for layer in model.language_model.layers:
        total += sum(p.numel() * p.element_size() for p in layer.self_attn.parameters())
        total += sum(
            p.numel() * p.element_size()
            for m in (layer.input_layernorm, layer.post_attention_layernorm)
            for p in m.parameters()
        )
        total += layer.mlp.gate.weight.numel() * layer.mlp.gate.weight.element_size()
    for layer, stats in zip(model.language_model.layers, out.moe_stats):
        moe = layer.mlp
        total += sum(e.expert_weights().nbytes for e, c in zip(moe.routed_experts, stats.counts) if c)
        total += sum(e.expert_weights().nbytes for e in moe.shared_experts)
    total += model.codec_head.weight.numel() * model.codec_head.weight.element_size()
    cache = stepper.cache
    total += sum(2 * k[:, :, : cache.length + 1].numel() * k.element_size() for k in cache.k)
    return total


@dataclass
class Row:
    requests: int
    rows: int
    dtype: str
    step_ms: float
    roof_ms: float
    step_over_roof: float
    cold_ms: float  # the first step after other models' steps and the read probe
    cold_over_roof: float
    rtf: float
    vs_fp32: float  # fp32 step / this step
    mb_per_step: float
    read_gbs: float
    touched_mean: float  # routed experts touched per layer


def time_steps(
    steppers: dict[str, Stepper], rounds: int, buf_N: torch.Tensor, block: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round, each model runs `block` consecutive steps (rotating order) and the read probe
    runs once. Returns (steady, cold) per name, one value per round: cold = the block's first
    step (right after another model's steps and the probe: caches hold other weights); steady =
    the median of the rest (what generation does: one step after another of the same model).
    With block 1 the two are the same."""
    names = list(steppers) + ["read"]
    fns = {**{k: s.step for k, s in steppers.items()}, "read": buf_N.sum}
    for fn in fns.values():
        fn(), fn()
    steady, cold = defaultdict(list), defaultdict(list)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            ts = []
            for _ in range(1 if name == "read" else block):
                t0 = time.perf_counter()
                fns[name]()
                ts.append(time.perf_counter() - t0)
            cold[name].append(ts[0])
            steady[name].append(statistics.median(ts[1:]) if len(ts) > 1 else ts[0])
    return steady, cold


def breakdown(model: UniMoEAudio, stepper: Stepper, reps: int) -> dict[str, float]:
    """ms per step spent in: expert kernels, the rest of the MoE layers (router, dispatch,
    combine), attention (incl. KV cache), norms, codec head, and everything else."""
    acc = defaultdict(float)
    hooks = []

    def timer(label):
        def pre(mod, args):
            mod._t0 = time.perf_counter()

        def post(mod, args, out):
            acc[label] += time.perf_counter() - mod._t0

        return pre, post

    def watch(mod, label):
        pre, post = timer(label)
        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post))

    for layer in model.language_model.layers:
        watch(layer.self_attn, "attention")
        watch(layer.mlp, "moe")
        watch(layer.input_layernorm, "norms")
        watch(layer.post_attention_layernorm, "norms")
        for lst in (layer.mlp.routed_experts, layer.mlp.shared_experts):
            for e in lst:
                watch(e, "experts")
    watch(model.language_model.norm, "norms")
    watch(model.codec_head, "codec head")
    try:
        stepper.step()
        acc.clear()
        t0 = time.perf_counter()
        for _ in range(reps):
            stepper.step()
        total = (time.perf_counter() - t0) / reps
    finally:
        for h in hooks:
            h.remove()
    res = {k: v / reps * 1e3 for k, v in acc.items()}
    res["moe (router, dispatch, combine)"] = res.pop("moe") - res["experts"]
    res["other (embed, rope, mask, guidance, sampling, python)"] = total * 1e3 - sum(res.values())
    res["total"] = total * 1e3
    return res


def quality(models: dict[str, UniMoEAudio], frames: int, seed: int) -> dict[str, dict]:
    cfg = models["fp32"].cfg
    gen = torch.Generator().manual_seed(seed)
    prompt = Prompt(input_ids_L=torch.randint(0, cfg.codec_placeholder_id, (24,), generator=gen))
    negative = Prompt(input_ids_L=torch.randint(0, cfg.codec_placeholder_id, (6,), generator=gen))
    ids_BL = torch.randint(0, cfg.codec_placeholder_id, (2, 40), generator=gen)
    codes_BKL = torch.randint(0, cfg.codebook_size, (2, cfg.codec_channels, 40), generator=gen)
    ids_BL[:, 20:] = cfg.codec_placeholder_id
    sampling = SamplingConfig(greedy=True, max_frames=frames, guidance_scale=3.0, seed=seed)
    res: dict[str, dict] = {}
    codes = {}
    with torch.inference_mode():
        ref_logits = models["fp32"](ids_BL, codes_BKL).codec_logits_BLKV.float()
        for name, model in models.items():
            t0 = time.perf_counter()
            codes[name] = generate(model, [prompt], [negative], sampling)[0]
            gen_s = time.perf_counter() - t0
            if name == "fp32":
                res[name] = {"frames": codes[name].shape[1], "generate_s": gen_s}
                continue
            err = (model(ids_BL, codes_BKL).codec_logits_BLKV.float() - ref_logits).abs()
            a, b = codes["fp32"], codes[name]
            n = min(a.shape[1], b.shape[1])
            same_KT = a[:, :n] == b[:, :n]
            differ = (~same_KT).any(0).nonzero()
            res[name] = {
                "logit_max_err": float(err.max()),
                "logit_mean_err": float(err.mean()),
                "logit_std": float(ref_logits.std()),
                "frames": b.shape[1],
                "code_agreement": float(same_KT.float().mean()),
                "first_diff_frame": int(differ[0]) if differ.numel() else None,
                "generate_s": gen_s,
            }
        # Teacher-forced: each model sees the fp32 model's greedy frames; top-1 agreement per step.
        ref = codes["fp32"]
        for name, model in models.items():
            if name != "fp32":
                res[name]["teacher_forced_top1"] = teacher_forced_top1(models["fp32"], model, prompt, ref)
    return res


def teacher_forced_top1(ref_model, model, prompt: Prompt, frames_KT: torch.Tensor) -> float:
    """Fraction of (frame, codebook) argmaxes equal between the two models when both read the
    same prompt and frames (unguided conditional row, delay pattern not applied: raw frames)."""
    cfg = model.cfg
    T = frames_KT.shape[1]
    ids = torch.cat([prompt.input_ids_L, torch.full((T,), cfg.codec_placeholder_id)])[None]
    codes = torch.cat(
        [
            torch.full((cfg.codec_channels, prompt.input_ids_L.numel()), cfg.codec_pad),
            frames_KT.clamp_max(cfg.codec_vocab_size - 1),
        ],
        dim=1,
    )[None]
    a = ref_model(ids, codes).codec_logits_BLKV[0, -T:].argmax(-1)
    b = model(ids, codes).codec_logits_BLKV[0, -T:].argmax(-1)
    return float((a == b).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--block",
        type=int,
        default=4,
        help="consecutive steps per model per round: the first is 'cold', the rest 'steady'",
    )
    ap.add_argument("--prompt", type=int, default=128, help="cached positions each step attends over")
    ap.add_argument("--requests", default="1,8")
    ap.add_argument("--expert-dtype", default="fp32,bf16,int8", help="comma list of fp32, bf16, int8")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--frames", type=int, default=200, help="greedy frames for --quality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--small-pages",
        action="store_true",
        help="also time each expert dtype with its weights left in ordinary 4 KiB pages (rows 'dtype/4k')",
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    dtypes = [d for d in args.expert_dtype.split(",") if d]
    if "fp32" not in dtypes:
        dtypes.insert(0, "fp32")  # the reference for ratios and quality
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--expert-dtype {d!r}: use fp32, bf16 or int8")

    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    base = UniMoEAudio(get_preset("small")).init_weights(seed=args.seed).eval()
    models = {}
    for d in dtypes:
        t0 = time.perf_counter()
        models[d] = convert_experts(copy.deepcopy(base), d)
        print(
            f"# {d}: experts converted, weights in huge pages, kernels selected in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    if args.small_pages:
        for d in dtypes:
            models[f"{d}/4k"] = convert_experts(copy.deepcopy(base), d, hugepages=False)
    print(
        f"# huge pages: THP {hugepages.mode() or 'unknown'}, AnonHugePages {hugepages.huge_bytes() / 2**20:.0f} MiB",
        flush=True,
    )
    del base
    sel = kernel_plans.plans()
    for key, plan in sorted(sel.items(), key=lambda kv: str(kv[0])):
        runs, last = [], None
        for n, name in zip(plan.limits, plan.names):
            if name != last:
                runs.append(f"{name}@{n}")
                last = name
        print(f"#   kernels {key} ({plan.source}): {', '.join(runs)}")
    if not sel:
        print(f"#   kernels: defaults ({autotune.ENV_MODE}={autotune.mode()})")

    buf_N = read_probe()
    read_gb = buf_N.numel() * 4 / 1e9
    rows: list[Row] = []
    extra: dict = {"breakdown": {}, "quality": None}
    for requests in [int(r) for r in args.requests.split(",")]:
        steppers = {d: Stepper(m, requests, args.prompt, args.seed) for d, m in models.items()}
        times, cold = time_steps(steppers, args.rounds, buf_N, args.block)
        for d, s in steppers.items():
            nbytes = step_bytes(models[d], s)
            touched = statistics.mean(sum(1 for c in st.counts if c) for st in s.last.moe_stats)
            roof_r = [nbytes / 1e9 / (read_gb / rd) for rd in times["read"]]
            rows.append(
                Row(
                    requests=requests,
                    rows=2 * requests,
                    dtype=d,
                    step_ms=statistics.median(times[d]) * 1e3,
                    roof_ms=statistics.median(roof_r) * 1e3,
                    step_over_roof=statistics.median(t / r for t, r in zip(times[d], roof_r)),
                    cold_ms=statistics.median(cold[d]) * 1e3,
                    cold_over_roof=statistics.median(t / r for t, r in zip(cold[d], roof_r)),
                    rtf=statistics.median(times[d]) * FRAMES_PER_S,
                    vs_fp32=statistics.median(f / t for f, t in zip(times["fp32"], times[d])),
                    mb_per_step=nbytes / 1e6,
                    read_gbs=statistics.median(read_gb / rd for rd in times["read"]),
                    touched_mean=touched,
                )
            )
            print(f"#   {requests} req {d}: {rows[-1].step_ms:.1f} ms (cold {rows[-1].cold_ms:.1f})", flush=True)
        if args.breakdown:
            for d, s in steppers.items():
                extra["breakdown"][f"{requests}req/{d}"] = breakdown(models[d], s, max(3, args.rounds // 3))
        del steppers
    print(machine_line())
    print(
        f"{'req':>3s} {'rows':>4s} {'experts':>7s} {'step ms':>8s} {'roof ms':>8s} {'step/roof':>9s} "
        f"{'cold ms':>8s} {'cold/roof':>9s} "
        f"{'RTF':>5s} {'fp32/this':>9s} {'MB/step':>8s} {'read GB/s':>9s} {'touched':>7s}"
    )
    for r in rows:
        print(
            f"{r.requests:3d} {r.rows:4d} {r.dtype:>7s} {r.step_ms:8.1f} {r.roof_ms:8.1f} {r.step_over_roof:9.2f} "
            f"{r.cold_ms:8.1f} {r.cold_over_roof:9.2f} "
            f"{r.rtf:5.2f} {r.vs_fp32:9.2f} {r.mb_per_step:8.1f} {r.read_gbs:9.1f} {r.touched_mean:7.2f}"
        )
    for label, parts in extra["breakdown"].items():
        print(f"# breakdown {label} (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    if args.quality:
        extra["quality"] = quality({d: m for d, m in models.items() if "/" not in d}, args.frames, args.seed)
        for d, q in extra["quality"].items():
            print(
                f"# quality {d}: "
                + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in q.items())
            )
        print(machine_line())
    if args.json:
        env = {
            "machine": kernel_cache.machine("cpu"),
            "loadavg_end": os.getloadavg(),
            "args": vars(args),
            "kernels": {str(k): {"source": p.source, "limits": p.limits, "names": p.names} for k, p in sel.items()},
        }
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": [asdict(r) for r in rows], **extra}, f, indent=1)


if __name__ == "__main__":
    main()
