r"""Routing analysis of a DCMoE checkpoint on shard rows (paper Fig. 3 and Fig. 5).

    python jobs/analyze_routing.py outputs/stage3 --shards data/mini_shards \
        --tokenizer data/mini/assets/tokenizer --out outputs/routing

Writes routing.json and, from it (unimoe_ray.eval.plots.plot_routing), experts_per_token.png
(per layer: share of tokens using k routed experts, and the mean), experts_per_token_by_task.png
(per layer and task: mean routed experts per token) and expert_share_by_task.png (per layer:
each routed expert's share of a task's tokens). Counts every real (unpadded) token of each
row: prompt and audio. No Ray needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.dataset as pads
import torch

from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.data.shards import shard_paths
from unimoe_ray.eval.plots import plot_routing
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.text.tokenizer import load_tokenizer
from unimoe_ray.train.batches import ExampleBuilder, collate, pack_by_tokens
from unimoe_ray.train.routing import routing_by_task, routing_report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows-per-task", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4096)
    args = p.parse_args(argv)

    model = load_pretrained(args.checkpoint, dtype=torch.float32)
    if model.cfg.moe.mode == "dense":
        raise SystemExit(f"error: {args.checkpoint} is a dense model (no router): pass a stage-2/3 checkpoint")
    build = ExampleBuilder(PromptBuilder(load_tokenizer(args.tokenizer), model.cfg), model.cfg)
    rows = pads.dataset(shard_paths(args.shards), format="parquet").to_table().to_pylist()
    by_task: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r["sample_id"]):
        if len(by_task.setdefault(r["task"], [])) < args.rows_per_task:
            by_task[r["task"]].append(build(r))
    batches = {t: [collate(b, model.cfg) for b in pack_by_tokens(ex, args.max_tokens)] for t, ex in by_task.items()}
    report = routing_report(routing_by_task(model, batches))
    report["checkpoint"] = str(Path(args.checkpoint).resolve())
    report["rows_per_task"] = {t: len(v) for t, v in by_task.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    for f in plot_routing(report, out):
        print(f"wrote {f}")
    print(f"wrote {out / 'routing.json'}")


if __name__ == "__main__":
    main()
