"""Expert parallelism benchmark: in-process experts vs Ray actor experts (plain calls, compiled
graph), on one DCMoE layer and on the whole model, at several tokens per step; plus cached
decode steps and the multi-node extrapolation.

    python benchmarks/expert_parallel.py --preset small --tokens 256 2048 8192

Every comparison runs side by side in one process, round-robin repeat by repeat, and compares
medians, so a noisy machine shifts both sides alike. Two phases per measurement, because in Ray
2.60 an idle compiled graph's readers busy-wait (unimoe_ray.parallel.backend): with the graph
parked, in-process vs plain calls; with the graph live (compiled once), in-process vs compiled.
On a machine with fewer cores than expert replicas + trunk, the live graph's spinning slows
everything, in-process included: "spin tax" = in-process(live) / in-process(parked).

The routers keep their random init (std 0.02): it routes ~4.9 experts per token on `small`,
close to the ~4.1 the preview's average activated parameters imply (printed below).

Outputs (ms, medians): exchange (one row to every expert: the fixed cost of a layer's exchange),
layer T (DCMoE layer 0 on T tokens), model T (full forward without the codec head on T tokens
in sequences of `--seq-len`), decode (one cached step, batch 2: a prompt and its CFG negative),
and the extrapolation of bytes per token per layer and link time for the preview model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import ray
import torch

from unimoe_ray.model.params import count_parameters
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel import (
    ActorResources,
    ExpertParallelConfig,
    RayExperts,
    attach_experts,
    launch_experts,
    shutdown_experts,
)
from unimoe_ray.presets import get_preset

LINKS_GBPS = (25, 100, 400)
PAPER_ACTIVATED = {"min": 2.8e9, "avg": 4.8e9, "max": 5.9e9}  # UniMoE-Audio paper, Table 1


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each function, run round-robin after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def two_phases(fns: dict[str, Callable[[], object]], repeats: int, graph: RayExperts) -> dict[str, float]:
    """in-process vs plain with the compiled graph parked, then in-process vs compiled with it
    live (built once, by the warm-up round). Keys: in-process, plain, in-process (live), compiled."""
    graph.park()
    parked = side_by_side({"in-process": fns["in-process"], "plain": fns["plain"]}, repeats)
    live = side_by_side({"in-process (live)": fns["in-process"], "compiled": fns["compiled"]}, repeats)
    graph.park()
    return parked | live


def decode_step_fn(model: UniMoEAudio, prompt_len: int = 32) -> Callable[[], None]:
    """A closure running one cached decode step (2 rows) per call, on a fresh cache each
    `prompt_len` steps so the cache never fills."""
    cfg = model.cfg
    ids = torch.randint(0, cfg.codec_placeholder_id, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    frame = torch.zeros(2, cfg.codec_channels, 1, dtype=torch.long)
    step_ids = torch.full((2, 1), cfg.codec_placeholder_id)
    state = {"cache": None, "left": 0}

    def step() -> None:
        if state["left"] == 0:
            state["cache"] = model.new_cache(2, 2 * prompt_len)
            model(ids, cache=state["cache"], logits_last_only=True)
            state["left"] = prompt_len
        model(step_ids, frame, cache=state["cache"], logits_last_only=True)
        state["left"] -= 1

    return step


def extrapolate(tokens: list[int]) -> dict:
    """Bytes per token per layer for the preview model with experts on other nodes, and the
    link time per layer. Hidden states go out and come back once per routed assignment."""
    cfg = get_preset("preview")
    counts = count_parameters(cfg)
    routed = {k: counts.num_routed - (counts.total - v) / counts.routed_expert for k, v in PAPER_ACTIVATED.items()}
    dtype_bytes = 2  # bf16
    bytes_per_token = 2 * routed["avg"] * cfg.hidden_size * dtype_bytes
    flops_per_token = routed["avg"] * 6 * cfg.hidden_size * cfg.moe.routed_intermediate
    rows = []
    for t in [2] + tokens:  # 2 = one decode step of a prompt and its CFG negative
        mb = t * bytes_per_token / 1e6
        rows.append(
            {
                "tokens": t,
                "MB_per_layer": mb,
                **{f"ms_at_{g}Gbps": mb * 8 / g for g in LINKS_GBPS},
                "expert_GFLOP_per_layer": t * flops_per_token / 1e9,
            }
        )
    return {
        "routed_per_token": routed,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_layers,
        "bytes_per_token_per_layer": bytes_per_token,
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    p.add_argument("--seq-len", type=int, default=256, help="sequence length of the full-model batches")
    p.add_argument("--exchange-repeats", type=int, default=50)
    p.add_argument("--layer-repeats", type=int, default=7)
    p.add_argument("--model-repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=30)
    p.add_argument("--expert-cpus", type=float, default=0.0, help="logical CPUs per expert replica")
    p.add_argument(
        "--routed",
        type=int,
        help="routed experts (= expert actors) instead of the preset's; fewer than the cores shows "
        "the exchange cost without CPU oversubscription on a small machine",
    )
    p.add_argument(
        "--trunk-threads",
        type=int,
        help="torch threads of this (trunk) process; with --routed 1 and 1 thread, the trunk and "
        "the one expert actor each have a core of a 2-core machine",
    )
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.trunk_threads is not None:
        torch.set_num_threads(args.trunk_threads)

    # Ray starts workers at niceness 15 and this driver (the trunk) runs at 0; on a shared machine
    # that would time the expert actors at a lower priority than the in-process baseline.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never join another cluster
    torch.manual_seed(0)
    cfg = get_preset(args.preset).replace(vision=None)  # the vision tower plays no part here
    if args.routed is not None:
        if args.routed < 1:
            p.error("--routed must be at least 1")
        cfg = cfg.replace(moe={"num_routed": args.routed})
    model = UniMoEAudio(cfg).init_weights(seed=0).eval()
    pcfg = ExpertParallelConfig(
        group="benchmark",
        expert_resources=ActorResources(num_cpus=args.expert_cpus),
        stats_interval_s=3600.0,
        graph_idle_s=600.0,
    )
    launch_experts(model, pcfg)
    compiled, plain = copy.deepcopy(model), copy.deepcopy(model)
    experts = {
        "compiled": attach_experts(compiled, pcfg),
        "plain": attach_experts(plain, dataclasses.replace(pcfg, exchange="plain")),
    }
    assert [e.exchange_kind for e in experts.values()] == ["compiled", "plain"]
    graph = experts["compiled"]
    models = {"in-process": model, "compiled": compiled, "plain": plain}
    results: dict = {
        "preset": args.preset,
        "cpus": ray.cluster_resources().get("CPU"),
        "torch_threads": torch.get_num_threads(),
    }

    with torch.inference_mode():
        # Fixed cost of one exchange: one row to every expert.
        x = torch.randn(cfg.moe.num_routed, cfg.hidden_size)
        ones = (1,) * cfg.moe.num_routed
        local = model.moe_layers[0].expert_backend
        results["exchange_ms"] = two_phases(
            {
                "in-process": lambda: local.run(0, x, ones),
                **{k: (lambda e=e: e.run(0, x, ones)) for k, e in experts.items()},
            },
            args.exchange_repeats,
            graph,
        )

        results["layer_ms"], results["model_ms"] = {}, {}
        for t in args.tokens:
            x_TD = torch.randn(t, cfg.hidden_size)
            results["layer_ms"][t] = two_phases(
                {k: (lambda m=m: m.moe_layers[0](x_TD)) for k, m in models.items()}, args.layer_repeats, graph
            )
            ids = torch.randint(0, cfg.codec_placeholder_id, (max(t // args.seq_len, 1), min(t, args.seq_len)))
            results["model_ms"][t] = two_phases(
                {k: (lambda m=m: m(ids, return_logits=False)) for k, m in models.items()}, args.model_repeats, graph
            )
            print(f"T={t}: layer {results['layer_ms'][t]}\n       model {results['model_ms'][t]}", flush=True)

        check_ids = torch.randint(0, cfg.codec_placeholder_id, (2, args.seq_len))
        out = model(check_ids)
        results["routed_per_token"] = sum(sum(s.counts) for s in out.moe_stats) / (check_ids.numel() * cfg.num_layers)
        results["max_abs_logit_diff"] = {
            k: float((models[k](check_ids).codec_logits_BLKV - out.codec_logits_BLKV).abs().max()) for k in experts
        }
        results["decode_step_ms"] = two_phases(
            {k: decode_step_fn(m) for k, m in models.items()}, args.decode_steps, graph
        )
        results["compiles"] = graph.compiles

    for e in experts.values():
        e.close()
    shutdown_experts("benchmark")
    results["extrapolation"] = extrapolate(args.tokens)
    report(results, cfg.num_layers)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def report(r: dict, num_layers: int) -> None:
    def row(label: str, m: dict) -> str:
        ip, ipl = m["in-process"], m["in-process (live)"]
        return (
            f"{label:>12} {ip:9.2f} {m['plain']:9.2f} {m['plain'] / ip:6.2f} {m['plain'] - ip:8.2f} | "
            f"{ipl:9.2f} {m['compiled']:9.2f} {m['compiled'] / ipl:6.2f} {m['compiled'] - ipl:8.2f} | "
            f"{ipl / ip:5.2f}"
        )

    print(
        f"\n{'ms':>12} {'in-proc':>9} {'plain':>9} {'pl/ip':>6} {'pl-ip':>8} | {'in-proc*':>9} "
        f"{'compiled':>9} {'cg/ip*':>6} {'cg-ip*':>8} | {'spin':>5}"
    )
    print(row("exchange", r["exchange_ms"]))
    for kind in ("layer", "model"):
        for t, m in r[f"{kind}_ms"].items():
            print(row(f"{kind} {t}", m))
    print(row("decode step", r["decode_step_ms"]))
    d = r["decode_step_ms"]
    print(
        f"(* measured while the compiled graph is live; spin = in-proc* / in-proc)\n"
        f"decode step overhead per layer ({num_layers} layers): plain "
        f"{(d['plain'] - d['in-process']) / num_layers:.2f} ms, compiled "
        f"{(d['compiled'] - d['in-process (live)']) / num_layers:.2f} ms"
    )
    print(
        f"routed experts per token (measured): {r['routed_per_token']:.2f}; compiled graphs built: "
        f"{r['compiles']}; max |logit diff| vs in-process: {r['max_abs_logit_diff']}"
    )
    e = r["extrapolation"]
    rp = e["routed_per_token"]
    print(
        f"\npreview: routed experts per token from the paper's activated parameters: min {rp['min']:.2f}, "
        f"avg {rp['avg']:.2f}, max {rp['max']:.2f}; bytes per token per layer (avg, bf16, out + back): "
        f"{e['bytes_per_token_per_layer'] / 1e3:.1f} kB"
    )
    print(f"{'tokens':>7} {'MB/layer':>9} " + " ".join(f"{f'ms@{g}G':>9}" for g in LINKS_GBPS) + f" {'GFLOP':>8}")
    for x in e["rows"]:
        print(
            f"{x['tokens']:>7} {x['MB_per_layer']:9.2f} "
            + " ".join(f"{x[f'ms_at_{g}Gbps']:9.3f}" for g in LINKS_GBPS)
            + f" {x['expert_GFLOP_per_layer']:8.1f}"
        )


if __name__ == "__main__":
    main()
