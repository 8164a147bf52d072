"""The Ray Data preprocessing pipeline: manifest -> staging Parquet -> shards (`shards.py`).

    manifest rows (driver)
      -> decode_row      flat_map, tasks      decode, mono, 16 kHz, segment music
      -> attach_video    map_batches, tasks   V2M frames at 1-2 fps in the vision-tower layout
      -> TokenizeText    actor (1)            normalise + tokenise text
      -> ScoreAudio      actor (1)            quality scores + filter rules
      -> EncodeAudio     actor pool (N x 1 CPU)  DAC codes, batched by length
      -> to_staging_table  tasks              plain Arrow schema
      -> write_parquet   streaming, no materialisation of the dataset

Cheap checks and filters run before the codec so it only encodes rows that will be kept.
Rows are never dropped inside the stream: a failing row carries status + reason to the end,
which is how the final counts add up. Ray Data's own progress bars show the stream.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from unimoe_ray.data.config import PreprocessConfig, check_rules, score_names
from unimoe_ray.data.decode import decode_row
from unimoe_ray.data.encode import EncodeAudio
from unimoe_ray.data.manifest import read_manifest
from unimoe_ray.data.shards import check_replaceable, finalize, replace_outputs
from unimoe_ray.data.stages import ScoreAudio, TokenizeText, attach_video, to_staging_table

log = logging.getLogger(__name__)


def build_dataset(rows: list[dict], cfg: PreprocessConfig) -> ray.data.Dataset:
    """Source rows -> the lazy Ray dataset of staging rows (nothing runs until consumed)."""
    light = cfg.light_cpus
    blocks = [pa.Table.from_pylist(rows[i : i + cfg.block_rows]) for i in range(0, len(rows), cfg.block_rows)]
    ds = ray.data.from_arrow(blocks)
    # Capped task pools: fractional CPUs alone would let Ray start a worker process per
    # quarter core, each importing torch.
    tasks = TaskPoolStrategy(size=cfg.light_tasks)
    ds = ds.flat_map(decode_row, fn_kwargs={"cfg": cfg.audio}, compute=tasks, num_cpus=light)
    ds = ds.map_batches(attach_video, fn_kwargs={"cfg": cfg.video}, batch_size=4, compute=tasks, num_cpus=light)
    ds = ds.map_batches(
        TokenizeText,
        fn_constructor_kwargs={"tokenizer_path": cfg.tokenizer_path},
        batch_size=64,
        compute=ActorPoolStrategy(size=1),
        num_cpus=light,
    )
    ds = ds.map_batches(
        ScoreAudio,
        fn_constructor_kwargs={"cfg": cfg.quality, "sample_rate": cfg.audio.sample_rate},
        batch_size=16,
        compute=ActorPoolStrategy(size=1),
        num_cpus=light,
    )
    ds = ds.map_batches(
        EncodeAudio,
        fn_constructor_kwargs={"cfg": cfg.encode},
        batch_size=cfg.encode.batch_rows,
        compute=ActorPoolStrategy(size=cfg.encode.actors),
        num_cpus=cfg.encode.threads_per_actor,
    )
    names = score_names(cfg.quality.model_scorers)
    return ds.map_batches(
        to_staging_table, fn_kwargs={"score_names": names}, batch_size=64, compute=tasks, num_cpus=light
    )


def run_preprocess(manifest: str | Path, out_dir: str | Path, cfg: PreprocessConfig) -> dict:
    """Run the pipeline on a manifest and write out_dir (see `shards.py` for its contents).
    Ray must be initialised. Returns the stats (also written to out_dir/stats.json).

    Everything is written to a new sibling folder `<out_dir>.tmp-<id>` that replaces out_dir
    only once the run succeeded (`shards.replace_outputs`): a run that fails, at any point,
    removes its folder and leaves the previous outputs as they were.

    Raises ValueError for a quality rule that could never apply, or an out_dir holding files
    that are not a previous run's outputs, before any work; RuntimeError when the DAC stage
    failed on most rows alike (see EncodeConfig.max_error_fraction)."""
    check_rules(cfg.quality)
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    rows = read_manifest(manifest)
    if not rows:
        raise ValueError(f"manifest {manifest} has no rows")
    new_dir = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    staging = new_dir / "_staging"
    try:
        start = time.perf_counter()
        build_dataset(rows, cfg).write_parquet(str(staging))
        log.info("pipeline wrote staging in %.1f s", time.perf_counter() - start)
        stats = finalize(
            staging,
            new_dir,
            score_names=score_names(cfg.quality.model_scorers),
            balance=cfg.balance,
            rows_per_shard=cfg.rows_per_shard,
            source_ids=[r["source_id"] for r in rows],
            max_encode_error_fraction=cfg.encode.max_error_fraction,
        )
        if not cfg.keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(new_dir, ignore_errors=True)
        log.error("preprocessing failed: %s is left as it was", out_dir)
        raise
    replace_outputs(new_dir, out_dir)
    return stats
