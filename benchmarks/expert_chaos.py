"""Chaos benchmark for an expert group: decode in a loop for a fixed time while a seeded chaos
driver SIGKILLs random expert replicas and the controller and scales random experts up and
down; every generation is compared with the fault-free output.

    python benchmarks/expert_chaos.py --preset small --duration 300 --seed 0

Reports generations completed / failed (target 0), codes identical to the fault-free run
(target all), the longest decode stall (gap between two decode steps) with and without chaos,
and per fault kind the median time until the group is whole again (every published replica
serving, none restarting, the controller answering) and the decode stall the fault caused.

The group runs on a local Ray head started by this script (`ray.init`), experts asking for no
CPU (2-core machines), with a compiled-graph trunk in this process. Kills are SIGKILLs of the
OS processes (a crash or the OOM killer), not `ray.kill`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import signal
import statistics
import threading
import time
from pathlib import Path

import ray
import torch

from unimoe_ray.inference.generate import SamplingConfig, generate
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel import ActorResources, ExpertParallelConfig, attach_experts, launch_experts, shutdown_experts
from unimoe_ray.parallel.admin import call_controller, get_controller
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompt import Prompt

ACTIONS = ("kill_expert", "kill_controller", "scale")
WEIGHTS = (0.5, 0.25, 0.25)
MAX_REPLICAS = 2  # per expert, so scale-ups stay within a small machine


def machine() -> dict:
    """CPU model, the ISA flags that matter for torch on CPU, threads, and load."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "fma"})
    return {"cpu": model, "isa": isa, "threads": os.cpu_count(), "loadavg": os.getloadavg()}


class Chaos(threading.Thread):
    """Seeded schedule: after `warmup_s`, one action every U(gap) seconds."""

    def __init__(self, group: str, seed: int, warmup_s: float, gap: tuple[float, float], stop: threading.Event):
        super().__init__(daemon=True)
        self.group, self.rng, self.warmup_s, self.gap, self.stop = group, random.Random(seed), warmup_s, gap, stop
        self.events: list[dict] = []
        self._topology = None

    def topology(self):
        try:
            self._topology = ray.get(get_controller(self.group).topology.remote(), timeout=5)
        except Exception:  # restarting: the last one seen will do to pick a victim
            pass
        return self._topology

    def run(self) -> None:
        if self.stop.wait(self.warmup_s):
            return
        while not self.stop.is_set():
            action = self.rng.choices(ACTIONS, WEIGHTS)[0]
            expert = self.rng.randrange(len(self.topology().replicas))
            pick = self.rng.random()
            event = {"t": time.monotonic(), "action": action, "expert": expert}
            try:
                getattr(self, action)(event, expert, pick)
            except Exception as err:  # the target was restarting already: nothing was done
                event["skipped"] = f"{type(err).__name__}: {err}"
            self.events.append(event)
            if not event.get("skipped") and action != "scale":
                threading.Thread(target=self.watch_recovery, args=(event,), daemon=True).start()
            self.stop.wait(self.rng.uniform(*self.gap))

    def kill_expert(self, event: dict, expert: int, pick: float) -> None:
        group = self._topology.replicas[expert]
        replica = group[int(pick * len(group))]
        os.kill(ray.get(replica.info.remote(), timeout=5)["pid"], signal.SIGKILL)

    def kill_controller(self, event: dict, expert: int, pick: float) -> None:
        event.pop("expert")
        os.kill(ray.get(get_controller(self.group).pid.remote(), timeout=5), signal.SIGKILL)

    def scale(self, event: dict, expert: int, pick: float) -> None:
        have = len(self._topology.replicas[expert])
        event["replicas"] = want = have + 1 if have < MAX_REPLICAS and pick < 0.6 else max(1, have - 1)

        def call() -> None:  # as an admin would: retry while the controller restarts
            deadline = time.monotonic() + 60
            while True:
                try:
                    call_controller(self.group, "unimoe", "scale", expert, want, timeout_s=None)
                    event["done_s"] = time.monotonic() - event["t"]
                    return
                except Exception as err:
                    retries = event.setdefault("retries", {})
                    first_line = f"{type(err).__name__}: {err}".splitlines()[0][:160]
                    retries[first_line] = retries.get(first_line, 0) + 1
                    if time.monotonic() > deadline:
                        event["error"] = f"{type(err).__name__}: {err}"
                        return
                    time.sleep(0.5)

        threading.Thread(target=call, daemon=True).start()

    def watch_recovery(self, event: dict) -> None:
        """Seconds from the fault until every published replica serves and none restarts."""
        deadline = event["t"] + 120
        time.sleep(0.5)  # let the GCS see the death first
        while time.monotonic() < deadline:
            try:
                status = call_controller(self.group, "unimoe", "status", timeout_s=5)
                topo = ray.get(get_controller(self.group).topology.remote(), timeout=5)
                if (
                    all(r.restarting == 0 for r in status.experts)
                    and tuple(r.replicas for r in status.experts) == topo.replica_counts
                ):
                    event["recovery_s"] = time.monotonic() - event["t"]
                    return
            except Exception:
                pass
            time.sleep(0.2)
        event["recovery_s"] = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of decoding under chaos")
    p.add_argument("--warmup", type=float, default=20.0, help="fault-free seconds first (baseline stalls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gap", type=float, nargs=2, default=(6.0, 12.0), help="seconds between chaos actions")
    p.add_argument("--max-frames", type=int, default=24)
    p.add_argument("--exchange", choices=("compiled", "plain"), default="compiled")
    p.add_argument("--out", default="benchmarks/results/expert_chaos.json")
    args = p.parse_args()

    torch.manual_seed(0)
    model = UniMoEAudio(get_preset(args.preset).replace(vision=None)).init_weights(seed=0).eval()
    sampling = SamplingConfig(greedy=True, guidance_scale=2.0, max_frames=args.max_frames)
    g = torch.Generator().manual_seed(1)
    pos = [Prompt(torch.randint(0, 400, (k,), generator=g)) for k in (8, 13)]
    neg = [Prompt(torch.randint(0, 400, (3,), generator=g)) for _ in pos]
    ref = generate(model, pos, neg, sampling)

    load_before = os.getloadavg()
    ray.init(
        address="local", include_dashboard=False, log_to_driver=False
    )  # never a `ray start` cluster found by chance
    cfg = ExpertParallelConfig(
        group="chaos",
        exchange=args.exchange,
        expert_resources=ActorResources(num_cpus=0),
        topology_poll_s=0.1,
        restart_timeout_s=60.0,
        stats_interval_s=3600.0,
    )
    launch_experts(model, cfg)
    trunk = copy.deepcopy(model)
    experts = attach_experts(trunk, cfg)
    steps: list[float] = []
    trunk.register_forward_pre_hook(lambda module, a: steps.append(time.monotonic()))

    stop = threading.Event()
    chaos = Chaos(cfg.group, args.seed, args.warmup, tuple(args.gap), stop)
    start = time.monotonic()
    chaos.start()
    gens = []
    while time.monotonic() - start < args.warmup + args.duration:
        t0 = time.monotonic()
        try:
            codes = generate(trunk, pos, neg, sampling)
            gens.append({"t": t0, "s": time.monotonic() - t0, "identical": all(map(torch.equal, codes, ref))})
        except Exception as err:
            gens.append({"t": t0, "s": time.monotonic() - t0, "error": f"{type(err).__name__}: {err}"[:300]})
    stop.set()
    chaos.join()
    time.sleep(3)  # let the last scale / recovery watchers finish
    experts_compiled, recoveries = experts.exchange_kind, experts.recoveries
    experts.close()
    shutdown_experts(cfg.group)
    ray.shutdown()

    chaos_t = start + args.warmup
    gaps = [(b - a, a) for a, b in zip(steps, steps[1:])]
    base = [g for g, a in gaps if a < chaos_t]
    under = [g for g, a in gaps if a >= chaos_t]

    def stall_after(t: float, window: float = 15.0) -> float:
        return max((g for g, a in gaps if a + g >= t and a <= t + window), default=0.0)

    done = [e for e in chaos.events if not e.get("skipped")]
    for e in done:
        e["stall_s"] = stall_after(e["t"])
    by_kind = {}
    for kind in ACTIONS:
        ev = [e for e in done if e["action"] == kind]
        rec = [e["recovery_s"] for e in ev if e.get("recovery_s") is not None]
        by_kind[kind] = {
            "count": len(ev),
            "median_recovery_s": statistics.median(rec) if rec else None,
            "max_recovery_s": max(rec) if rec else None,
            "unrecovered": sum(1 for e in ev if "recovery_s" in e and e["recovery_s"] is None),
            "median_stall_s": statistics.median([e["stall_s"] for e in ev]) if ev else None,
            "scale_errors": sum(1 for e in ev if "error" in e),
        }
    under_gens = [g for g in gens if g["t"] >= chaos_t]
    result = {
        "preset": args.preset,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "gap_s": args.gap,
        "max_frames": args.max_frames,
        "exchange": experts_compiled,
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "generations": {
            "total": len(gens),
            "under_chaos": len(under_gens),
            "completed": sum("error" not in g for g in gens),
            "failed": sum("error" in g for g in gens),
            "identical": sum(bool(g.get("identical")) for g in gens),
            "median_s": statistics.median(g["s"] for g in gens),
        },
        "errors": sorted({g["error"] for g in gens if "error" in g}),
        "trunk_recoveries": recoveries,
        "max_stall_s": {"fault_free": max(base, default=0.0), "under_chaos": max(under, default=0.0)},
        "median_step_s": statistics.median(g for g, _ in gaps) if gaps else None,
        "faults": by_kind,
        "skipped_actions": sum(1 for e in chaos.events if e.get("skipped")),
        "events": [{**e, "t": round(e["t"] - start, 2)} for e in chaos.events],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=2, default=str))


if __name__ == "__main__":
    main()
