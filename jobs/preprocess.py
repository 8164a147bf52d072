r"""Preprocess a manifest into training shards with Ray Data (unimoe_ray.data.pipeline).

Local:    python jobs/preprocess.py --manifest data/mini/manifest.jsonl --out data/mini_shards \
              --tokenizer data/mini/assets/tokenizer --dac-path data/mini/assets/dac_random.pth
Cluster:  ray job submit --working-dir . -- python jobs/preprocess.py --manifest ... (ray.init()
          joins RAY_ADDRESS, which `ray job submit` sets; without it, a local Ray starts.)

Quality rules: --min/--max SCORE=VALUE on a score of the run (snr_db, clipping_ratio, silence_ratio,
or a scorer's from --model-scorer KIND[:OUTPUT]=PATH, kinds utmos, aesthetics, clap) for the tasks
its scorer judges; any other name is an error (unimoe_ray.data.config.quality_config).
"""

from __future__ import annotations

import argparse
import json
import logging

import ray

from unimoe_ray.data.config import (
    AudioConfig,
    BalanceConfig,
    EncodeConfig,
    PreprocessConfig,
    VideoConfig,
    preprocess_config,
)
from unimoe_ray.data.pipeline import run_preprocess


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSONL, CSV or Parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (unimoe_ray.text.tokenizer)")
    p.add_argument("--dac-path", default=None, help="DAC .pth (default: $UNIMOE_DAC_PATH)")
    p.add_argument("--encode-actors", type=int, default=EncodeConfig.actors)
    p.add_argument("--threads-per-actor", type=int, default=EncodeConfig.threads_per_actor)
    p.add_argument("--batch-rows", type=int, default=EncodeConfig.batch_rows)
    p.add_argument(
        "--max-encode-error-fraction",
        type=float,
        default=EncodeConfig.max_error_fraction,
        help="fail when one kind of DAC error (e.g. out of memory) hits more than this fraction "
        "of the rows the codec received (1: never fail)",
    )
    p.add_argument("--music-window-s", type=float, default=AudioConfig.music_window_s)
    p.add_argument("--min-duration-s", type=float, default=AudioConfig.min_duration_s)
    p.add_argument("--video-fps", type=float, default=VideoConfig.fps)
    p.add_argument("--model-scorer", dest="model_scorers", action="append", default=[], metavar="KIND[:OUTPUT]=PATH")
    p.add_argument("--min", dest="mins", action="append", default=[], metavar="SCORE=VALUE")
    p.add_argument("--max", dest="maxs", action="append", default=[], metavar="SCORE=VALUE")
    p.add_argument("--no-default-rules", dest="default_rules", action="store_false")
    p.add_argument("--target", dest="targets", action="append", default=[], metavar="TASK=ROWS")
    p.add_argument("--balance-total", type=int, default=None, help="equal split over tasks")
    p.add_argument("--seed", type=int, default=BalanceConfig.seed)
    p.add_argument("--rows-per-shard", type=int, default=PreprocessConfig.rows_per_shard)
    args = vars(p.parse_args(argv))
    manifest, out = args.pop("manifest"), args.pop("out")
    try:
        cfg = preprocess_config(**args)  # before Ray starts: a bad option fails in a second
    except ValueError as err:
        p.error(str(err))

    logging.basicConfig(level=logging.INFO)
    ray.init()  # joins RAY_ADDRESS when set (ray job submit), else starts a local Ray
    stats = run_preprocess(manifest, out, cfg)
    print(json.dumps({k: stats[k] for k in ("items_in", "out", "quarantined", "filtered")}, indent=2))


if __name__ == "__main__":
    main()
