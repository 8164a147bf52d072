"""Read a manifest (JSONL, CSV or Parquet) into the pipeline's source table.

Columns: task, audio (path), text or caption, and optionally video, speaker, language; others
are ignored. Relative paths are relative to the manifest's folder. Rows the pipeline cannot
even start on (unknown task, no audio path, a repeat of an earlier row's task + audio) are
marked quarantined here, in manifest order, and still flow through the pipeline so the final
counts cover every row.

The manifest is metadata only (no media), so it is read on the driver: that is where
duplicates are found in a defined order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from unimoe_ray.data.config import TASKS
from unimoe_ray.data.schema import OK, QUARANTINED, source_id

SOURCE_COLUMNS = (
    "source_id",
    "task",
    "audio",
    "audio_path",
    "video",
    "video_path",
    "text",
    "speaker",
    "language",
    "status",
    "reason",
    "detail",
)


def _load_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        # Every column as string: a transcript like "1984" must not become an integer.
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        return table.cast(pa.schema([pa.field(n, pa.string()) for n in table.column_names])).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"manifest {path}: expected .jsonl, .csv or .parquet")


def _resolve(base: Path, rel: str) -> str:
    if not rel:
        return ""
    p = Path(rel)
    return str(p if p.is_absolute() else (base / p).resolve())


def read_manifest(path: str | Path) -> list[dict]:
    """Manifest -> source rows (dicts with SOURCE_COLUMNS), in manifest order."""
    path = Path(path)
    base = path.parent.resolve()
    seen: dict[str, int] = {}
    rows = []
    for raw in _load_rows(path):
        task = str(raw.get("task") or "")
        audio = str(raw.get("audio") or "")
        video = str(raw.get("video") or "")
        text = raw.get("text") if raw.get("text") is not None else raw.get("caption")
        sid = source_id(task, audio)
        reason = ""
        if task not in TASKS:
            reason = "unknown_task"
        elif not audio:
            reason = "missing_audio"
        elif sid in seen:
            reason = "duplicate"
        seen[sid] = seen.get(sid, 0) + 1
        if seen[sid] > 1:  # its own id, so every item in the outputs has a unique one
            sid = source_id(task, f"{audio}#repeat{seen[sid] - 1}")
        rows.append(
            dict(
                source_id=sid,
                task=task,
                audio=audio,
                audio_path=_resolve(base, audio),
                video=video,
                video_path=_resolve(base, video),
                text=str(text or ""),
                speaker=str(raw.get("speaker") or ""),
                language=str(raw.get("language") or ""),
                status=QUARANTINED if reason else OK,
                reason=reason,
                detail="",
            )
        )
    return rows
