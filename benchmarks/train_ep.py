"""Expert-parallel training on Ray Train: W=2 workers with --expert-parallel 1 (DDP, every
worker holds every routed expert) against 2 (each holds half, tokens by all_to_all), side by
side in one run: peak resident memory per worker, the parameter + gradient + AdamW bytes each
worker holds (expert share ≈ 1/N), tokens/s, and the exchanges' share of a step.

    python benchmarks/train_ep.py --preset small --steps 8

Each configuration is a real `run_training` (TorchTrainer, gloo, stage-3 settings, synthetic
shards in the preprocess schema). tokens/s: a step's global real tokens over its wall time,
median over the steps after the first two. Exchange share: Σ over the step's all_to_all calls
(counts and rows, forward and backward, on gloo including the wait for the slower rank) over
the step's wall time, median, per rank. Peak RSS: each worker's ru_maxrss after its last step.
Writes benchmarks/results/train_ep.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import ray
from machine import machine_line  # benchmarks/machine.py

from unimoe_ray.builders import new_model
from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.presets import get_preset
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.memory_plan import plan
from unimoe_ray.train.run import RunSpec, run_training
from unimoe_ray.train.synthetic import write_synthetic_shards


def record_rss(*, step, rank, run_dir):
    """step_callback: each worker's peak RSS so far (MiB), one file per rank."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    (Path(run_dir) / f"rss_rank{rank}.json").write_text(json.dumps({"step": step, "peak_rss_mb": peak}))


def held_bytes(cfg, ep: int, max_tokens: int) -> dict:
    """The memory plan of one worker (unimoe_ray.train.memory_plan, fp32 activations as on CPU),
    in MiB: parameters, gradients, AdamW state (the routed experts' part ≈ 1/N) and activations."""
    m = plan(cfg, workers=2, expert_parallel=ep, seq_len=max_tokens, dtype="fp32", attention_probs=True)
    return {k: v / 2**20 for k, v in m.as_dict().items() if k != "runs_in_trainer"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (memory)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=1024, help="per micro-batch and worker")
    p.add_argument("--expert-parallel", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="benchmarks/results/train_ep.json")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_train_ep_"))
    tok = build_test_tokenizer(root / "tok")
    cfg = get_preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    model = new_model(cfg, load_tokenizer(tok), seed=0)
    cfg = model.cfg  # sized to the tokenizer: the memory plan counts its embedding rows
    save_pretrained(model, root / "init")
    write_synthetic_shards(root / "shards", {"tts_en": 48, "t2m": 24}, frames=(100, 400))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    before = machine_line()
    print(before)
    rows = []
    for ep in args.expert_parallel:
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
                expert_parallel=ep,
            ),
            name=f"ep{ep}",
            storage_path=str(root / "store"),
            num_workers=2,
            max_failures=0,
        )
        spec.step_callback = record_rss
        result = run_training(spec)
        if result.error is not None:
            raise result.error
        metrics = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = metrics[2:] or metrics
        wall = [m["tokens"] / m["tokens_per_s"] for m in steady]
        row = {
            "expert_parallel": ep,
            "tokens_per_s_median": statistics.median(m["tokens_per_s"] for m in steady),
            "tokens_per_step_median": statistics.median(m["tokens"] for m in steady),
            "peak_rss_mb": [
                json.loads((spec.run_dir / f"rss_rank{r}.json").read_text())["peak_rss_mb"] for r in range(2)
            ],
            "plan_mib": held_bytes(cfg, ep, args.max_tokens),
            "wall_s": time.time() - t0,
        }
        if ep > 1:
            row["exchange_share_median"] = [
                statistics.median(m[f"ep/rank{r}/exchange_s"] / w for m, w in zip(steady, wall)) for r in range(2)
            ]
            row["imbalance_median"] = statistics.median(m["ep/imbalance"] for m in steady)
        rows.append(row)
        print(
            f"expert_parallel={ep}: {row['tokens_per_s_median']:.0f} tokens/s, peak RSS "
            f"{row['peak_rss_mb']} MiB, planned params+grads+AdamW "
            f"{row['plan_mib']['params'] + row['plan_mib']['grads'] + row['plan_mib']['optimizer']:.0f} MiB "
            f"(experts {row['plan_mib']['expert_params'] + row['plan_mib']['expert_grads'] + row['plan_mib']['expert_optimizer']:.0f}), "
            f"activations {row['plan_mib']['activations']:.0f} MiB/worker"
            + (f", exchange share {row['exchange_share_median']}" if ep > 1 else "")
        )
    result = {
        "preset": args.preset,
        "layers": cfg.num_layers,
        "steps": args.steps,
        "max_tokens": args.max_tokens,
        "machine_before": before,
        "machine_after": machine_line(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
