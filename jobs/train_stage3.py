r"""Stage 3 of the curriculum (docs/DESIGN.md §2): synergistic joint training of everything.

    python jobs/train_stage3.py --init outputs/stage2 --shards data/balanced \
        --tokenizer data/mini/assets/tokenizer --out outputs/stage3
    ray job submit --working-dir . -- python jobs/train_stage3.py --init … (same flags)

The aux-loss weight decays linearly with the global step (the config's l_aux_weight →
min_l_aux_weight over l_aux_weight_decay_steps); on resume it continues from the
checkpoint's step. lr 1e-5.
"""

from __future__ import annotations

import argparse

from unimoe_ray.train.stages import (
    ALL_TASKS,
    add_common_args,
    common_from_args,
    run_job,
    stage3,
    train_config_from_args,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the stage-2 output folder")
    p.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=ALL_TASKS)
    add_common_args(p, "stage3")
    args = p.parse_args(argv)
    stage3(
        common_from_args(args),
        init=args.init,
        train=train_config_from_args("stage3", args),
        out=args.out,
        name=args.name or "stage3",
        tasks=tuple(args.tasks),
    )


if __name__ == "__main__":
    run_job(main)
