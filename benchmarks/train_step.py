"""Training throughput on Ray Train: tokens/s of one worker vs two DDP workers (gloo, CPU) and
the peak resident memory per worker, side by side in one run.

    python benchmarks/train_step.py --preset small --steps 12

Each configuration is a real `run_training` (TorchTrainer, stage-3 settings, synthetic shards
in the preprocess schema); tokens/s is the global real tokens of a step over its wall time
(forward + backward + all-reduce + optimizer), median over the steps after the first two.
Prints the machine (CPU model, ISA flags, cores) and the load average with the figures;
writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray

from unimoe_ray.builders import new_model
from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.presets import get_preset
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.run import RunSpec, run_training
from unimoe_ray.train.synthetic import write_synthetic_shards


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
        )
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f in flags]
    except (OSError, StopIteration):
        pass
    info["loadavg"] = os.getloadavg()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (memory)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=2048, help="per micro-batch and worker")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    tok = build_test_tokenizer(root / "tok")
    cfg = get_preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    save_pretrained(new_model(cfg, load_tokenizer(tok), seed=0), root / "init")
    write_synthetic_shards(root / "shards", {"tts_en": 48, "t2m": 24}, frames=(100, 400))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    before = machine()
    rows = []
    for n in args.workers:
        t0 = time.time()
        spec = RunSpec(
            shards=[str(root / "shards")],
            tokenizer=str(tok),
            init=str(root / "init"),
            train=stage_config(
                "stage3",
                tasks=("tts_en", "t2m"),
                max_steps=args.steps,
                warmup_steps=1,
                max_tokens=args.max_tokens,
                val_every=0,
                checkpoint_every=args.steps,
            ),
            name=f"w{n}",
            storage_path=str(root / "store"),
            num_workers=n,
            max_failures=0,
        )
        run_training(spec)
        metrics = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
        tps = [m["tokens_per_s"] for m in metrics[2:]]
        rows.append(
            {
                "workers": n,
                "tokens_per_s_median": statistics.median(tps),
                "tokens_per_s_all": tps,
                "tokens_per_step_median": statistics.median(m["tokens"] for m in metrics[2:]),
                "peak_rss_mb_per_worker": max(m["peak_rss_mb"] for m in metrics),
                "wall_s": time.time() - t0,
            }
        )
        print(
            f"workers={n}: {rows[-1]['tokens_per_s_median']:.0f} tokens/s, peak RSS "
            f"{rows[-1]['peak_rss_mb_per_worker']:.0f} MiB/worker"
        )
    base = rows[0]["tokens_per_s_median"]
    for r in rows:
        r["scaling_vs_first"] = r["tokens_per_s_median"] / base
    result = {
        "preset": args.preset,
        "layers": cfg.num_layers,
        "steps": args.steps,
        "max_tokens": args.max_tokens,
        "machine_before": before,
        "machine_after": machine(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    for r in rows:
        print(
            f"  {r['workers']} worker(s): {r['tokens_per_s_median']:.0f} tokens/s "
            f"(x{r['scaling_vs_first']:.2f}), {r['peak_rss_mb_per_worker']:.0f} MiB peak/worker"
        )


if __name__ == "__main__":
    main()
