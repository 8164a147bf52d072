"""One expert exchange round trip (issue 3): in-process vs a compiled-graph exchange with small
messages as raw bytes (the default) vs the same exchange with every message in the numpy form
(`ExpertParallelConfig(inband_max_bytes=0)`), side by side in one run.

    .venv/bin/python benchmarks/exchange_roundtrip.py [--rows 2] [--routed 1] [--rounds 3]

Each round attaches a trunk to the expert group once per wire form (one compiled graph at a
time: a group has one compiled-graph trunk), times `--calls` exchanges of `--rows` rows to every
expert back to back and `--calls` more with `--gap-ms` of sleep before each (a decode step's
attention work between two layers, during which the channel readers back off into sleeps),
then detaches. Medians over all rounds; "overhead" = exchange − in-process (the expert's
compute is in both). With the default `--routed 1`, the trunk (1 torch thread) and the one
expert actor have a core each on a 2-core machine.
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

from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel import ActorResources, ExpertParallelConfig, attach_experts, launch_experts, shutdown_experts
from unimoe_ray.presets import get_preset

FORMS = {"bytes": None, "numpy": 0}  # inband_max_bytes (None: the config's default)


def timed_calls(fn: Callable[[], object], calls: int, gap_s: float) -> list[float]:
    out = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--routed", type=int, default=1, help="routed experts (= expert actors)")
    p.add_argument("--rows", type=int, default=2, help="rows per expert per exchange (2: a CFG decode step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=5.0)
    p.add_argument("--trunk-threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.routed < 1 or args.rows < 1:
        p.error("--routed and --rows must be at least 1")

    torch.set_num_threads(args.trunk_threads)
    os.environ.setdefault("RAY_worker_niceness", "0")  # experts at the trunk's priority
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    cfg = get_preset(args.preset).replace(vision=None, moe={"num_routed": args.routed})
    model = UniMoEAudio(cfg).init_weights(seed=0).eval()
    base = ExpertParallelConfig(
        group="exchange-bench", expert_resources=ActorResources(num_cpus=0), stats_interval_s=3600.0, graph_idle_s=600.0
    )
    launch_experts(model, base)
    counts = (args.rows,) * args.routed
    x_ND = torch.randn(args.rows * args.routed, cfg.hidden_size)
    local = model.moe_layers[0].expert_backend
    times: dict[str, dict[str, list[float]]] = {
        name: {"back-to-back": [], "after gap": []} for name in ("in-process", *FORMS)
    }

    with torch.inference_mode():
        for _ in range(args.rounds):
            for name in ("in-process", *FORMS):
                if name == "in-process":
                    experts, fn = None, lambda: local.run(0, x_ND, counts)
                else:
                    changes = {} if FORMS[name] is None else {"inband_max_bytes": FORMS[name]}
                    experts = attach_experts(copy.deepcopy(model), dataclasses.replace(base, **changes))
                    assert experts.exchange_kind == "compiled"
                    fn = lambda e=experts: e.run(0, x_ND, counts)  # noqa: E731
                try:
                    timed_calls(fn, 20, 0.0)  # warm-up (compiles the graph)
                    times[name]["back-to-back"] += timed_calls(fn, args.calls, 0.0)
                    times[name]["after gap"] += timed_calls(fn, args.calls, args.gap_ms / 1e3)
                finally:
                    if experts is not None:
                        experts.close()
    shutdown_experts(base.group)

    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}
    print(
        f"\n{args.routed} expert actor(s), {args.rows} rows each, trunk {args.trunk_threads} thread(s); "
        f"median ms over {args.rounds} x {args.calls} calls"
    )
    print(f"{'':>12} {'back-to-back':>13} {'overhead':>9} {'after gap':>10} {'overhead':>9}")
    for name, m in med.items():
        ip = med["in-process"]
        print(
            f"{name:>12} {m['back-to-back']:13.3f} {m['back-to-back'] - ip['back-to-back']:9.3f} "
            f"{m['after gap']:10.3f} {m['after gap'] - ip['after gap']:9.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_ms": med}, f, indent=2)


if __name__ == "__main__":
    main()
