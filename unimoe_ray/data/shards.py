"""Staging -> final outputs: balanced, sorted shards, quarantine and filtered lists, stats.json.

The Ray pipeline writes every item (ok, quarantined or filtered) to a staging Parquet folder in
whatever order Ray finishes them. This step, on the driver with pyarrow alone, makes the
outputs deterministic: selection is by sample-id hash (`balance.py`), rows are sorted by sample
id, shard k holds selected rows [k * rows_per_shard, (k + 1) * rows_per_shard) of that order, and
files get fixed names. Memory: the small metadata columns of all items, plus one staging file
and one shard at a time.

Outputs in out_dir:
    shard-00000.parquet ...   training rows (schema.shard_schema)
    quarantine.parquet        unusable inputs with reason and detail
    filtered.parquet          usable inputs dropped by quality rules or balancing
    stats.json                counts and hours per task, drops by reason; items_in == out +
                              quarantined + filtered

`run_preprocess` has `finalize` write into a new sibling folder, then `replace_outputs` swaps
it in for the previous outputs (two renames), so a failed re-run never leaves a mix of old
and new shards.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from unimoe_ray.data.balance import resolve_targets, select_balanced
from unimoe_ray.data.config import TASKS, BalanceConfig, EncodeConfig
from unimoe_ray.data.encode import check_encode_errors
from unimoe_ray.data.schema import FILTERED, OK, QUARANTINED, filtered_schema, quarantine_schema, shard_schema

_META = ["sample_id", "source_id", "task", "status", "reason", "duration_s"]


class ShardPathError(ValueError):
    """A --shards argument names no shard files; the message says what to pass instead."""


def shard_paths(shards: list[str | Path]) -> list[str]:
    """Parquet files (absolute paths) from files or folders (a folder: its shard-*.parquet, as
    `finalize` writes them). Training, the evaluation harness and the routing analysis read
    their shards through this one function."""
    paths: list[str] = []
    for s in shards:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("shard-*.parquet"))
            if not found:
                raise ShardPathError(
                    f"{p} holds no shard-*.parquet files: point --shards at the output of jobs/preprocess.py"
                )
            paths += [str(f.resolve()) for f in found]
        elif p.is_file():
            paths.append(str(p.resolve()))
        else:
            raise ShardPathError(f"shard path {p} does not exist")
    return paths


def _write(table: pa.Table, path: Path) -> None:
    """Sorted by sample id, fixed writer settings: same rows -> same bytes."""
    table = table.sort_by("sample_id")
    pq.write_table(table, path, compression="zstd", row_group_size=256)


# What a run writes in its out_dir (and all that `replace_outputs` may delete there).
OUTPUT_NAMES = ("quarantine.parquet", "filtered.parquet", "stats.json", "_staging", "_parts")


def check_replaceable(out_dir: Path) -> None:
    """out_dir is missing, empty, or holds only a previous run's outputs: a re-run replaces
    the whole folder, so anything else in it would be deleted."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file: give a folder path")
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name not in OUTPUT_NAMES and not (p.name.startswith("shard-") and p.suffix == ".parquet")
    )
    if foreign:
        raise ValueError(
            f"output folder {out_dir} holds files that are not preprocessing outputs "
            f"({', '.join(foreign[:5])}): a run replaces the whole folder; pick a new or empty folder"
        )


def replace_outputs(new_dir: Path, out_dir: Path) -> None:
    """Swap a finished run's folder in for out_dir: the old folder is renamed aside, the new
    one renamed in, then the old one deleted. Each rename is atomic; a crash between the two
    leaves both folders beside out_dir (`<out>.old-<id>`: the previous outputs, whole)."""
    old_dir = None
    if out_dir.exists():
        old_dir = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(out_dir, old_dir)
    os.rename(new_dir, out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir)


def _hours(seconds: float) -> float:
    return round(seconds / 3600.0, 6)


def finalize(
    staging: Path,
    out_dir: Path,
    *,
    score_names: tuple[str, ...],
    balance: BalanceConfig,
    rows_per_shard: int,
    source_ids: list[str],
    max_encode_error_fraction: float = EncodeConfig().max_error_fraction,
) -> dict:
    """Write the outputs from the staging folder and return the stats (also in stats.json).

    Args:
        source_ids: the manifest rows' source ids, to check every row came out as something.
        max_encode_error_fraction: see EncodeConfig.max_error_fraction; above it, raises
            RuntimeError before writing anything (the staging folder stays for inspection).
    """
    staged = pads.dataset(staging, format="parquet")
    meta = staged.to_table(columns=_META).sort_by("sample_id")  # fixed order: sums repeat exactly
    outcome = staged.to_table(columns=["status", "reason", "detail"])
    check_encode_errors(
        *(outcome.column(c).to_pylist() for c in outcome.column_names), max_fraction=max_encode_error_fraction
    )
    if len(set(meta["sample_id"].to_pylist())) != meta.num_rows:
        raise RuntimeError("duplicate sample ids in staging: a stage emitted a row twice")
    missing = set(source_ids) - set(meta["source_id"].to_pylist())
    if missing:
        raise RuntimeError(f"{len(missing)} manifest rows produced no item, e.g. {sorted(missing)[:3]}")

    ok = meta.filter(pc.equal(meta["status"], OK))
    ids_by_task: dict[str, list[str]] = defaultdict(list)
    for sid, task in zip(ok["sample_id"].to_pylist(), ok["task"].to_pylist()):
        ids_by_task[task].append(sid)
    available = {t: len(ids) for t, ids in sorted(ids_by_task.items())}
    targets = resolve_targets(balance, available)
    keep = select_balanced(ids_by_task, targets, balance.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    shard_names = _write_shards(staged, out_dir, keep, score_names, rows_per_shard)

    quarantine_cols = quarantine_schema().names
    _write(
        staged.to_table(columns=quarantine_cols, filter=pc.field("status") == QUARANTINED).cast(quarantine_schema()),
        out_dir / "quarantine.parquet",
    )
    filtered = staged.to_table(
        columns=filtered_schema(score_names).names + ["status"], filter=pc.field("status") != QUARANTINED
    )
    filtered = filtered.filter(pc.invert(pc.is_in(filtered["sample_id"], pa.array(sorted(keep), pa.string()))))
    balance_dropped = pc.equal(filtered["status"], OK)
    filtered = filtered.set_column(
        filtered.schema.get_field_index("reason"),
        "reason",
        pc.if_else(balance_dropped, pa.scalar("balance"), filtered["reason"]),
    ).drop_columns(["status"])
    _write(filtered.cast(filtered_schema(score_names)), out_dir / "filtered.parquet")

    stats = _stats(meta, keep, available, targets, shard_names, len(source_ids))
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def _write_shards(
    staged: pads.Dataset, out_dir: Path, keep: set[str], score_names: tuple[str, ...], rows_per_shard: int
) -> list[str]:
    """Two passes: route each staging file's selected rows to per-shard parts, then sort and
    write each shard."""
    order = {sid: k // rows_per_shard for k, sid in enumerate(sorted(keep))}
    n_shards = -(-len(order) // rows_per_shard)
    schema = shard_schema(score_names)
    parts = out_dir / "_parts"
    shutil.rmtree(parts, ignore_errors=True)
    for j, fragment in enumerate(sorted(staged.get_fragments(), key=lambda f: f.path)):
        table = fragment.to_table(columns=schema.names, filter=pc.field("status") == OK)
        if table.num_rows == 0:
            continue
        shard_of = pa.array([order.get(sid, -1) for sid in table["sample_id"].to_pylist()], pa.int64())
        for k in sorted(set(shard_of.to_pylist()) - {-1}):
            part = table.filter(pc.equal(shard_of, k))
            (parts / f"{k:05d}").mkdir(parents=True, exist_ok=True)
            pq.write_table(part, parts / f"{k:05d}" / f"{j:05d}.parquet")
    names = []
    for k in range(n_shards):
        name = f"shard-{k:05d}.parquet"
        _write(pq.read_table(parts / f"{k:05d}").cast(schema), out_dir / name)
        names.append(name)
    shutil.rmtree(parts, ignore_errors=True)
    return names


def _stats(
    meta: pa.Table,
    keep: set[str],
    available: dict[str, int],
    targets: dict[str, int],
    shard_names: list[str],
    manifest_rows: int,
) -> dict:
    rows = meta.to_pylist()
    out = [r for r in rows if r["sample_id"] in keep]
    quarantined = [r for r in rows if r["status"] == QUARANTINED]
    filtered = [r for r in rows if r["status"] == FILTERED or (r["status"] == OK and r["sample_id"] not in keep)]
    for r in filtered:
        if r["status"] == OK:
            r["reason"] = "balance"

    def per_task(items: list[dict], with_hours: bool) -> dict:
        count = Counter(r["task"] for r in items)
        secs = Counter()
        for r in items:
            secs[r["task"]] += r["duration_s"]
        return {
            t: ({"rows": count[t], "hours": _hours(secs[t])} if with_hours else count[t])
            for t in TASKS
            if count[t] or with_hours
        }

    stats = {
        "manifest_rows": manifest_rows,
        "items_in": len(rows),
        "out": {
            "rows": len(out),
            "hours": _hours(sum(r["duration_s"] for r in out)),
            "by_task": per_task(out, with_hours=True),
        },
        "quarantined": {
            "rows": len(quarantined),
            "by_reason": dict(sorted(Counter(r["reason"] for r in quarantined).items())),
            "by_task": per_task(quarantined, with_hours=False),
        },
        "filtered": {
            "rows": len(filtered),
            "by_reason": dict(sorted(Counter(r["reason"] for r in filtered).items())),
            "by_task": per_task(filtered, with_hours=False),
        },
        "balance": {"available": available, "targets": targets},
        "shards": shard_names,
    }
    stats["counts_add_up"] = stats["items_in"] == len(out) + len(quarantined) + len(filtered)
    if not stats["counts_add_up"]:
        raise RuntimeError(f"counts do not add up: {stats}")
    return stats
