r"""Stage 2 of the curriculum (docs/DESIGN.md §2): MoE integration + warm-up.

    python jobs/train_stage2.py --specialists outputs/specialists/* --shards data/balanced \
        --tokenizer data/mini/assets/tokenizer --out outputs/stage2
    ray job submit --working-dir . -- python jobs/train_stage2.py --specialists … (same flags)

Each specialist's FFN is split into proto-experts, the rest averaged, the vision tower taken
from the V2M specialist, a new router and shared experts added (unimoe_ray.train.integrate);
then only the router and the shared experts train, on the balanced shards. lr 3e-5.
"""

from __future__ import annotations

import argparse

from unimoe_ray.train.stages import (
    ALL_TASKS,
    add_common_args,
    common_from_args,
    run_job,
    stage2,
    train_config_from_args,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specialists", nargs="+", required=True, help="stage-1 outputs, one per task")
    p.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=ALL_TASKS)
    add_common_args(p, "stage2")
    args = p.parse_args(argv)
    stage2(
        common_from_args(args),
        specialists=args.specialists,
        train=train_config_from_args("stage2", args),
        out=args.out,
        name=args.name or "stage2",
        tasks=tuple(args.tasks),
    )


if __name__ == "__main__":
    run_job(main)
