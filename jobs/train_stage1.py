r"""Stage 1 of the curriculum (docs/DESIGN.md §2): one dense specialist per task, on its raw data.

    python jobs/train_stage1.py --task tts_en --preset small --shards data/mini_shards \
        --tokenizer data/mini/assets/tokenizer --out outputs/specialists
    ray job submit --working-dir . -- python jobs/train_stage1.py --task tts_en tts_zh t2m v2m …

Several --task values train one specialist after another. Each lands in OUT/<task> (the
input of jobs/train_stage2.py). The specialist's FFN width is (routed experts ÷ 4) × routed
width of the preset, so that stage 2 splits it exactly into proto-experts. Without
RAY_ADDRESS an embedded local Ray starts; re-running with the same --name resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unimoe_ray.train.stages import (
    ALL_TASKS,
    add_common_args,
    common_from_args,
    run_job,
    stage1,
    train_config_from_args,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", nargs="+", required=True, choices=ALL_TASKS)
    p.add_argument("--preset", default="small", help="model size: tiny, small, preview or a config.json")
    p.add_argument("--num-specialists", type=int, default=4, help="specialists stage 2 will merge")
    p.add_argument(
        "--init-from", default=None, help="local Qwen2.5-VL folder (Hugging Face layout) every specialist starts from"
    )
    add_common_args(p, "stage1")
    args = p.parse_args(argv)
    common = common_from_args(args)
    train = train_config_from_args("stage1", args)
    for task in args.task:
        name = f"{args.name or 'stage1'}_{task}"
        stage1(
            common,
            task=task,
            preset=args.preset,
            train=train,
            out=str(Path(args.out) / task),
            name=name,
            num_specialists=args.num_specialists,
            init_from=args.init_from,
        )


if __name__ == "__main__":
    run_job(main)
