"""Batch inference on Ray Data: a task file (the released `examples/test_tasks.json` form, or
JSONL) → WAVs plus a result manifest with one row per item.

    task objects (driver: parsed, each checked on its own)
      -> GenerateTasks   map_batches, actor pool (N generator actors, batch_size=1)
      -> manifest rows   status ok | failed, reason, output path, frames, seconds

An item that cannot run (unknown voice, missing file, empty text) becomes a failed manifest
row naming its reason; the others complete. A failure inside generation is caught the same
way, so the job always accounts for every item.

The manifest is written as items finish, one JSON line each (append, flush, fsync): a job
that dies (driver killed, node lost) leaves every finished item recorded, and at most a torn
last line, which `read_manifest_rows` drops. `resume=True` keeps the `ok` rows whose WAV
exists and runs only the rest. At the end the whole manifest is rewritten in the task file's
order (a temporary file, then `os.replace`: a reader sees the old file or the new one).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from unimoe_ray.audio.codec import FRAME_RATE
from unimoe_ray.inference.tasks import TaskError, TaskRequest, read_task_file

MANIFEST_COLUMNS = ("task_id", "task", "status", "output", "frames", "seconds_audio", "seconds_wall", "error")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    checkpoint: str
    tokenizer: str | None = None
    dac_path: str | None = None
    voice_library: str | None = None
    voice_root: str | None = None
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    device: str = "cpu"
    dtype: str | None = None
    expert_dtype: str | None = None
    seed: int | None = None
    max_seconds: float | None = None


class GenerateTasks:
    """One generator actor: loads the model once, runs one task per call."""

    def __init__(self, cfg: BatchConfig) -> None:
        import torch

        from unimoe_ray.inference.pipeline import AudioGenerator
        from unimoe_ray.inference.voices import VoiceLibrary

        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg = cfg
        self.gen = AudioGenerator.load(
            cfg.checkpoint,
            cfg.tokenizer or cfg.checkpoint,
            cfg.dac_path,
            device=cfg.device,
            dtype=cfg.dtype,
            expert_dtype=cfg.expert_dtype,
        )
        self.voices = VoiceLibrary.load(cfg.voice_library, root=cfg.voice_root) if cfg.voice_library else None

    def __call__(self, batch: dict) -> dict:
        from unimoe_ray.inference.tasks import run_task

        rows = []
        for raw in batch["task_json"]:
            item = json.loads(raw)
            defaults = {}
            if self.cfg.seed is not None:
                defaults["seed"] = self.cfg.seed
            if self.cfg.max_seconds is not None:
                defaults["max_frames"] = max(1, round(self.cfg.max_seconds * FRAME_RATE))
            try:
                rows.append(run_task(self.gen, TaskRequest(**item), self.voices, **defaults))
            except (ValueError, OSError) as err:  # TaskError, VoiceError, VideoError, AudioError
                rows.append(_failed(item["task_id"], item["task"], str(err)))
            except Exception as err:  # noqa: BLE001 — one item must not sink the batch
                rows.append(_failed(item["task_id"], item["task"], f"{type(err).__name__}: {err}"))
        return {k: np.array([r.get(k) for r in rows], dtype=object) for k in MANIFEST_COLUMNS}


def _failed(task_id: str, task: str | None, reason: str) -> dict:
    return {
        "task_id": task_id,
        "task": task,
        "status": "failed",
        "output": None,
        "frames": None,
        "seconds_audio": None,
        "seconds_wall": None,
        "error": reason,
    }


def parse_tasks(path: str | Path, voices=None) -> tuple[list[TaskRequest], list[dict], list[str]]:
    """Task objects → (runnable requests, failed manifest rows, every task id in file order).
    Paths in the file are taken relative to the task file's folder."""
    path = Path(path)
    good, bad = [], []
    seen: set[str] = set()
    ids: list[str] = []
    for i, item in enumerate(read_task_file(path)):
        tid = str(item.get("task_id", f"task_{i:04d}")) if isinstance(item, dict) else f"task_{i:04d}"
        ids.append(tid)
        try:
            if isinstance(item, dict) and "_error" in item:
                raise TaskError(item["_error"])
            req = TaskRequest.from_released(item, i, base=path.parent)
            if req.task_id in seen:
                raise TaskError(f"task_id {req.task_id!r} appears twice: task ids name the output files")
            seen.add(req.task_id)
            req.check(voices)
            good.append(req)
        except ValueError as err:
            bad.append(_failed(tid, item.get("task_type") if isinstance(item, dict) else None, str(err)))
    return good, bad, ids


class ManifestWriter:
    """Appends manifest rows as they finish: one line per row, flushed and fsynced before the
    next, so a crash loses no finished item."""

    def __init__(self, path: Path, *, keep: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep and path.is_file() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line torn by a crash mid-write: close it off
                    f.write(b"\n")
        self._f = open(path, "a" if keep else "w", encoding="utf-8")

    def append(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_manifest_rows(path: str | Path) -> dict[str, dict]:
    """task_id -> its last row in a manifest (a re-run appends after the earlier rows); lines
    that are not JSON (a line torn by a crash) are skipped."""
    rows: dict[str, dict] = {}
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "task_id" in row:
            rows[row["task_id"]] = row
    return rows


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def run_batch(
    tasks_file: str | Path, out_manifest: str | Path, cfg: BatchConfig, *, resume: bool = False
) -> list[dict]:
    """Run every task of `tasks_file`; write the manifest (JSONL) as items finish and return
    its rows. resume: skip the tasks the manifest already records as ok with their WAV on
    disk (failed ones run again)."""
    from unimoe_ray.inference.voices import VoiceLibrary

    voices = VoiceLibrary.load(cfg.voice_library, root=cfg.voice_root) if cfg.voice_library else None
    good, bad, ids = parse_tasks(tasks_file, voices)
    out = Path(out_manifest)
    done: dict[str, dict] = {}
    if resume:
        done = {
            tid: r
            for tid, r in read_manifest_rows(out).items()
            if r.get("status") == "ok" and r.get("output") and Path(r["output"]).is_file()
        }
        good = [r for r in good if r.task_id not in done]
        print(f"resume: {len(done)} tasks already done in {out}; {len(good)} to run")
    rows = list(done.values())
    writer = ManifestWriter(out, keep=resume)
    t0 = time.perf_counter()
    try:
        for r in bad:
            writer.append(r)
            rows.append(r)
        if good:
            items = [{"task_json": json.dumps(r.__dict__)} for r in good]
            ds = ray.data.from_items(items).map_batches(
                GenerateTasks,
                fn_constructor_kwargs={"cfg": cfg},
                batch_size=1,
                compute=ActorPoolStrategy(size=min(cfg.actors, len(good))),
                num_cpus=cfg.cpus_per_actor,
                num_gpus=cfg.gpus_per_actor or None,
            )
            for r in ds.iter_rows():  # streamed: each row as its item finishes
                row = {k: _plain(v) for k, v in r.items()}
                writer.append(row)
                rows.append(row)
    finally:
        writer.close()
    order = {tid: i for i, tid in enumerate(ids)}
    final = sorted(rows, key=lambda r: order.get(r["task_id"], len(order)))  # the task file's order
    _write_atomically(out, "".join(json.dumps(r) + "\n" for r in final))
    ok = sum(r["status"] == "ok" for r in final)
    print(f"{ok}/{len(final)} tasks ok in {time.perf_counter() - t0:.1f} s; manifest {out}")
    for r in final:
        if r["status"] != "ok":
            print(f"  failed {r['task_id']}: {r['error']}")
    return final


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v
