"""Serving load test: N concurrent clients for a fixed time against one model replica, three
ways of batching the same model:

- continuous: the real deployment (serve/model.AudioModel): one DecodeEngine, requests join
  the running batch after their prefill and leave when done; audio streams (TTFA = first chunk);
- static: `@serve.batch` over `generate` (requests arriving within batch_wait_timeout_s run
  as one fixed batch until its longest row ends; audio after the batch);
- unbatched: the same deployment with max_batch_size 1 (one request at a time).

Clients call the deployment through Serve handles (the ingress adds the same HTTP cost to
every mode). Each request asks for a random length (max_seconds in [min, max]) with its own
seed, so rows of different lengths share the batch as in real traffic.

    python benchmarks/serve_load.py --preset small --clients 1 4 8 16 --seconds 20

Prints a table and writes benchmarks/results/serve_load.json (with the machine and its load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve

from unimoe_ray.inference.generate import generate
from unimoe_ray.inference.streaming import decode_whole
from unimoe_ray.model import kernel_cache
from unimoe_ray.serve.formats import SAMPLE_RATE
from unimoe_ray.serve.model import AudioModel
from unimoe_ray.serve.runtime import AudioJob, ModelRuntime
from unimoe_ray.serve.settings import ModelSettings


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class StaticBatchModel:
    """`generate` over whole requests, batched by @serve.batch (max_batch_size set per run)."""

    def __init__(self, settings: dict, max_batch_size: int) -> None:
        self.rt = ModelRuntime(ModelSettings.from_dict(settings))
        self._batch.set_max_batch_size(max_batch_size)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batch(self, jobs: list[AudioJob]) -> list:
        reqs = [self.rt.engine_request(j) for j in jobs]
        negatives = [r.negative for r in reqs]
        codes = await asyncio.to_thread(
            generate, self.rt.model, [r.prompt for r in reqs], negatives, [r.sampling for r in reqs]
        )
        return codes

    async def generate(self, job: AudioJob, stream: bool):
        t0 = time.monotonic()
        codes = await self._batch(job)
        wav = await asyncio.to_thread(decode_whole, self.rt.gen.codec, codes, SAMPLE_RATE)
        yield {"type": "audio", "wav": wav}
        yield {
            "type": "done",
            "frames": int(codes.shape[1]),
            "seconds": codes.shape[1] / self.rt.gen.codec.frame_rate,
            "ttfa_s": time.monotonic() - t0,
        }


def machine() -> dict:
    """kernel_cache.machine (CPU model, ISA, torch, threads: what the kernel choice is keyed by)
    plus the Python version and the load now."""
    return {
        **kernel_cache.machine("cpu"),
        "python": platform.python_version(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }


async def client_loop(handle, deadline: float, rng: random.Random, lo: float, hi: float, out: list) -> None:
    while time.monotonic() < deadline:
        secs = round(rng.uniform(lo, hi), 2)
        job = AudioJob(
            task="speech",
            text="The quick brown fox jumps over the lazy dog.",
            sampling={"seed": rng.randrange(1 << 30)},
            max_seconds=secs,
        )
        t0 = time.monotonic()
        ttfa, audio, err = None, 0.0, None
        try:
            async for ev in handle.options(stream=True).generate.remote(job, True):
                if ev["type"] == "audio":
                    ttfa = ttfa if ttfa is not None else time.monotonic() - t0
                    audio += len(ev["wav"]) / SAMPLE_RATE
        except Exception as e:  # counted, never hidden
            err = f"{type(e).__name__}: {e}"[:200]
        out.append({"start": t0, "latency": time.monotonic() - t0, "ttfa": ttfa, "audio_s": audio, "error": err})


async def load(handle, clients: int, seconds: float, lo: float, hi: float, seed: int) -> dict:
    out: list[dict] = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    await asyncio.gather(*(client_loop(handle, deadline, random.Random(seed + i), lo, hi, out) for i in range(clients)))
    wall = time.monotonic() - t0  # includes the requests in flight at the deadline
    ok = [r for r in out if r["error"] is None]
    lat = np.array([r["latency"] for r in ok]) if ok else np.zeros(1)
    ttfa = np.array([r["ttfa"] for r in ok if r["ttfa"] is not None]) if ok else np.zeros(1)
    return {
        "clients": clients,
        "requests": len(out),
        "errors": len(out) - len(ok),
        "error_examples": sorted({r["error"] for r in out if r["error"]})[:3],
        "wall_s": round(wall, 2),
        "req_per_s": round(len(ok) / wall, 3),
        "audio_s_per_s": round(sum(r["audio_s"] for r in ok) / wall, 3),
        "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
        "p99_latency_s": round(float(np.percentile(lat, 99)), 3),
        "p50_ttfa_s": round(float(np.percentile(ttfa, 50)), 3),
        "p99_ttfa_s": round(float(np.percentile(ttfa, 99)), 3),
    }


def autoscale(settings: dict, args) -> list[dict]:
    """Replicas of an autoscaled continuous deployment under `max(clients)` clients for
    `seconds`, then idle for as long: (t, phase, running replicas, target) every 2 s."""
    cfg = {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 2,
        "downscale_delay_s": 10,
        "metrics_interval_s": 1,
        "look_back_period_s": 4,
    }
    app = AudioModel.options(
        name="bench",
        user_config=settings,
        max_ongoing_requests=64,
        autoscaling_config=cfg,
        ray_actor_options={"num_cpus": 0.5},
    ).bind("bench")
    handle = serve.run(app, name="bench_autoscale", route_prefix=None)
    timeline: list[dict] = []
    t0 = time.monotonic()

    phase = ["load"]

    async def watch() -> None:
        while True:
            st = serve.status().applications["bench_autoscale"].deployments["bench"]
            row = {
                "t": round(time.monotonic() - t0, 1),
                "phase": phase[0],
                "running": st.replica_states.get("RUNNING", 0),
                "starting": st.replica_states.get("STARTING", 0),
                "status": str(st.status),
            }
            timeline.append(row)
            print(row, flush=True)
            await asyncio.sleep(2)

    async def run() -> None:
        watcher = asyncio.create_task(watch())
        # Clients stop sending at the deadline; "drain" lasts until their last requests return.
        stats = asyncio.create_task(
            load(handle, max(args.clients), args.seconds, args.min_audio, args.max_audio, seed=7)
        )
        await asyncio.sleep(args.seconds)
        phase[0] = "drain"
        print(await stats, flush=True)
        phase[0] = "idle"
        await asyncio.sleep(max(args.seconds, 30))
        watcher.cancel()

    asyncio.run(run())
    serve.delete("bench_autoscale")
    return timeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["continuous", "static", "unbatched"],
        choices=["continuous", "static", "unbatched"],
    )
    p.add_argument("--seconds", type=float, default=20.0, help="load duration per point")
    p.add_argument("--min-audio", type=float, default=0.5)
    p.add_argument("--max-audio", type=float, default=2.0)
    p.add_argument("--max-rows", type=int, default=32, help="continuous: KV slots (2 per request)")
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--expert-dtype",
        choices=["fp32", "bf16", "int8"],
        default=None,
        help="the replica's expert weights (user_config expert_dtype; default: as loaded)",
    )
    p.add_argument("--artifacts", default="outputs/serve_artifacts")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    p.add_argument(
        "--autoscale",
        action="store_true",
        help="instead: continuous deployment with autoscaling (1-3 replicas), load then idle, "
        "replica counts from serve.status() over time",
    )
    args = p.parse_args()

    settings = {
        "preset": args.preset,
        "artifacts_dir": args.artifacts,
        "torch_threads": args.threads,
        "max_rows": args.max_rows,
        "max_len": 400,
        "max_waiting": 256,
        "expert_dtype": args.expert_dtype,
    }
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:  # Serve's proxy starts anyway: keep it off the default port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {"machine_before": machine(), "args": vars(args), "runs": []}
    print(json.dumps(results["machine_before"]))
    if args.autoscale:
        results["autoscale"] = autoscale(settings, args)
        args.modes = []
    for mode in args.modes:
        if mode == "continuous":
            app = AudioModel.options(name="bench", user_config=settings, max_ongoing_requests=256).bind("bench")
        else:
            size = args.static_batch if mode == "static" else 1
            app = StaticBatchModel.options(name="bench", max_ongoing_requests=256).bind(settings, size)
        handle = serve.run(app, name=f"bench_{mode}", route_prefix=None)
        asyncio.run(load(handle, 1, 3.0, args.min_audio, args.min_audio, 999))  # warm-up
        for n in args.clients:
            r = asyncio.run(load(handle, n, args.seconds, args.min_audio, args.max_audio, seed=n))
            r.update(mode=mode, load=os.getloadavg()[0])
            results["runs"].append(r)
            print(
                f"{mode:10s} clients={n:3d} req/s={r['req_per_s']:6.2f} audio-s/s={r['audio_s_per_s']:6.2f} "
                f"p50/p99 lat={r['p50_latency_s']:.2f}/{r['p99_latency_s']:.2f}s "
                f"p50/p99 TTFA={r['p50_ttfa_s']:.2f}/{r['p99_ttfa_s']:.2f}s errors={r['errors']} "
                f"load={r['load']:.1f}",
                flush=True,
            )
        serve.delete(f"bench_{mode}")
    results["machine_after"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
