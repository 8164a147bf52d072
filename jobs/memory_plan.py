r"""Per-rank training memory for a model, before training: parameters, gradients, AdamW state and
activations for each (workers, expert-parallel size, ZeRO stage) asked (unimoe_ray.train.
memory_plan; the model is built on the meta device, nothing is materialised).

    python jobs/memory_plan.py --preset preview --workers 8 16 --expert-parallel 1 8 --zero 0 2 \
        --seq-len 4096 --dtype bf16 --device-gib 80

Rows a configuration cannot use (N not dividing W or the experts) are left out; `what-if` marks
ZeRO with N > 1, which the trainer does not run.
"""

from __future__ import annotations

import argparse
import json

from unimoe_ray.config_hf import load_config
from unimoe_ray.presets import get_preset
from unimoe_ray.train.memory_plan import markdown_table, plan_grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="preview", help="tiny, small or preview")
    src.add_argument("--config", help="a checkpoint folder (its config.json) instead of a preset")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16])
    p.add_argument("--expert-parallel", type=int, nargs="+", default=[1, 8])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2], choices=[0, 1, 2, 3])
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per micro-batch and rank")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="activation dtype")
    p.add_argument("--trainable", default="all", choices=["all", "router_and_shared"], help="stage 3 / stage 2")
    p.add_argument("--routed-per-token", type=float, default=4.0, help="average routed experts per token")
    p.add_argument("--attention-probs", action="store_true", help="the attention kernel keeps softmax probabilities")
    p.add_argument("--device-gib", type=float, default=80.0, help="memory per device, for the 'fits' column")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = p.parse_args(argv)
    cfg = load_config(args.config) if args.config else get_preset(args.preset)
    rows = plan_grid(
        cfg,
        workers=args.workers,
        expert_parallel=args.expert_parallel,
        zero_stages=args.zero,
        seq_len=args.seq_len,
        dtype=args.dtype,
        trainable=args.trainable,
        routed_per_token=args.routed_per_token,
        attention_probs=args.attention_probs,
    )
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"# {args.config or args.preset}: seq_len {args.seq_len}, {args.dtype} activations, trainable "
        f"{args.trainable}, {args.routed_per_token:g} routed experts/token; GiB per rank"
    )
    print(markdown_table(rows, device_gib=args.device_gib))


if __name__ == "__main__":
    main()
