"""Preprocess a manifest into training shards with Ray Data (unimoe_ray.data.pipeline).

Local:    python jobs/preprocess.py --manifest data/mini/manifest.jsonl --out data/mini_shards \
              --tokenizer data/mini/assets/tokenizer --dac-path data/mini/assets/dac_random.pth
Cluster:  ray job submit --working-dir . -- python jobs/preprocess.py --manifest ... (ray.init()
          joins the cluster named by RAY_ADDRESS, which `ray job submit` sets; without it, a
          local Ray starts.)

Model scorers: --model-scorer utmos=/w/utmos.pt --min utmos=3.0 (KIND[:OUTPUT]=PATH; kinds
utmos, aesthetics, clap). --min/--max NAME=VALUE add a rule on a score column for the tasks
that scorer applies to (signal scorers: all tasks). NAME must be a score of the run: snr_db,
clipping_ratio, silence_ratio, or a model scorer's name; any other name is an error.
"""

from __future__ import annotations

import argparse
import json
import logging

import ray

from unimoe_ray.data.config import (
    DEFAULT_RULES,
    MODEL_SCORER_TASKS,
    TASKS,
    AudioConfig,
    BalanceConfig,
    EncodeConfig,
    ModelScorerSpec,
    PreprocessConfig,
    QualityConfig,
    QualityRule,
    VideoConfig,
)
from unimoe_ray.data.pipeline import run_preprocess
from unimoe_ray.data.quality import check_rules


def _pairs(items: list[str], cast=str) -> list[tuple[str, object]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        out.append((key, cast(value)))
    return out


def build_config(args: argparse.Namespace) -> PreprocessConfig:
    scorers = []
    for kind_index, path in _pairs(args.model_scorer):
        kind, _, index = kind_index.partition(":")
        scorers.append(
            ModelScorerSpec(
                kind=kind,
                path=path,
                tasks=MODEL_SCORER_TASKS.get(kind, TASKS),
                output_index=int(index) if index else None,
            )
        )
    tasks_of = {s.name or s.kind: s.tasks for s in scorers}
    rules = [] if args.no_default_rules else list(DEFAULT_RULES)
    for bound, pairs in (("min_value", args.min), ("max_value", args.max)):
        rules += [
            QualityRule(scorer=name, tasks=tasks_of.get(name, TASKS), **{bound: value})
            for name, value in _pairs(pairs, float)
        ]
    quality = QualityConfig(rules=tuple(rules), model_scorers=tuple(scorers))
    check_rules(quality)  # e.g. --min snr=15 (the score is snr_db) must not silently do nothing
    return PreprocessConfig(
        tokenizer_path=args.tokenizer,
        audio=AudioConfig(music_window_s=args.music_window_s, min_duration_s=args.min_duration_s),
        video=VideoConfig(fps=args.video_fps),
        encode=EncodeConfig(
            dac_path=args.dac_path,
            actors=args.encode_actors,
            threads_per_actor=args.threads_per_actor,
            batch_rows=args.batch_rows,
            max_error_fraction=args.max_encode_error_fraction,
        ),
        quality=quality,
        balance=BalanceConfig(
            targets=tuple(_pairs(args.target, int)), total=args.balance_total, seed=args.seed
        ),
        rows_per_shard=args.rows_per_shard,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", required=True, help="JSONL, CSV or Parquet")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer folder (unimoe_ray.text.tokenizer)"
    )
    p.add_argument("--dac-path", default=None, help="DAC .pth (default: $UNIMOE_DAC_PATH)")
    p.add_argument("--encode-actors", type=int, default=1)
    p.add_argument("--threads-per-actor", type=int, default=1)
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument(
        "--max-encode-error-fraction",
        type=float,
        default=EncodeConfig().max_error_fraction,
        help="fail when one kind of DAC error (e.g. out of memory) hits more than this "
        "fraction of the rows the codec received (1: never fail)",
    )
    p.add_argument("--music-window-s", type=float, default=20.0)
    p.add_argument("--min-duration-s", type=float, default=1.0)
    p.add_argument("--video-fps", type=float, default=2.0)
    p.add_argument("--model-scorer", action="append", default=[], metavar="KIND[:OUTPUT]=PATH")
    p.add_argument("--min", action="append", default=[], metavar="SCORE=VALUE")
    p.add_argument("--max", action="append", default=[], metavar="SCORE=VALUE")
    p.add_argument("--no-default-rules", action="store_true")
    p.add_argument("--target", action="append", default=[], metavar="TASK=ROWS")
    p.add_argument("--balance-total", type=int, default=None, help="equal split over tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-shard", type=int, default=2000)
    args = p.parse_args(argv)
    try:
        cfg = build_config(args)  # before Ray starts: a bad option fails in a second
    except ValueError as err:
        p.error(str(err))

    logging.basicConfig(level=logging.INFO)
    ray.init()  # joins RAY_ADDRESS when set (ray job submit), else starts a local Ray
    stats = run_preprocess(args.manifest, args.out, cfg)
    print(
        json.dumps({k: stats[k] for k in ("items_in", "out", "quarantined", "filtered")}, indent=2)
    )


if __name__ == "__main__":
    main()
