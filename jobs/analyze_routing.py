"""Routing analysis of a DCMoE checkpoint on shard rows (paper Fig. 3 and Fig. 5).

    python jobs/analyze_routing.py outputs/stage3 --shards data/mini_shards \
        --tokenizer data/mini/assets/tokenizer --out outputs/routing

Writes experts_per_token.png (per layer: share of tokens using k routed experts, and the
mean), expert_share_by_task.png (per layer: each routed expert's share of a task's tokens)
and routing.json with the numbers. Counts every real (unpadded) token of each row: prompt
and audio. No Ray needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import torch  # noqa: E402

from unimoe_ray.checkpoint import load_pretrained  # noqa: E402
from unimoe_ray.text.prompts import PromptBuilder  # noqa: E402
from unimoe_ray.text.tokenizer import load_tokenizer  # noqa: E402
from unimoe_ray.train.batches import ExampleBuilder, collate, pack_by_tokens  # noqa: E402
from unimoe_ray.train.routing import routing_by_task, routing_report  # noqa: E402
from unimoe_ray.data.shards import shard_paths  # noqa: E402


def plot(report: dict, out: Path) -> list[Path]:
    layers, E = report["layers"], report["num_routed"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.6 * (E + 1)), max(3.0, 1.0 + 0.35 * len(layers))))
    share = [lay["k_share"] for lay in layers]
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for y, lay in enumerate(layers):
        ax.plot(lay["mean_routed_experts"], y, "w|", markersize=14, mew=2)
    ax.set(xlabel="routed experts per token (| = mean)", ylabel="layer", xticks=range(E + 1),
           title="Share of tokens by number of routed experts")
    fig.colorbar(im, ax=ax, label="share of tokens")
    f1 = out / "experts_per_token.png"
    fig.tight_layout()
    fig.savefig(f1, dpi=120)
    plt.close(fig)

    tasks = report["tasks"]
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.8 + 0.4 * len(tasks) * rows), squeeze=False)
    for i, lay in enumerate(layers):
        ax = axes[i // cols][i % cols]
        im = ax.imshow([lay["expert_share_by_task"][t] for t in tasks], aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set(title=f"layer {i}", xticks=range(E), yticks=range(len(tasks)), yticklabels=tasks, xlabel="expert")
    for j in range(len(layers), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the task's tokens")
    fig.suptitle("Routed expert's share of each task's tokens")
    f2 = out / "expert_share_by_task.png"
    fig.savefig(f2, dpi=120)
    plt.close(fig)
    return [f1, f2]


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
    for f in plot(report, out):
        print(f"wrote {f}")
    print(f"wrote {out / 'routing.json'}")


if __name__ == "__main__":
    main()
