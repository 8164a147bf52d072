"""The evaluation report on disk: eval.json (every number, per task and per item, and the
reason for every metric not computed) and eval.md (one Markdown table row per task)."""

from __future__ import annotations

import json
from pathlib import Path

_COLUMNS = (  # (key, header, format)
    ("rows", "rows", "{:d}"),
    ("ce", "CE", "{:.3f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("experts_per_token", "experts/token", "{:.2f}"),
    ("generated", "gens", "{:d}"),
    ("eos_rate", "EOS rate", "{:.2f}"),
    ("duration_abs_s", "dur err s", "{:.2f}"),
    ("duration_rel", "dur err rel", "{:.2f}"),
    ("silence_ratio", "silence", "{:.3f}"),
    ("clipping_ratio", "clipping", "{:.3f}"),
    ("wer", "WER %", "{:.2f}"),
    ("cer", "CER %", "{:.2f}"),
    ("speaker_sim", "SIM", "{:.3f}"),
    ("utmos", "UTMOS", "{:.2f}"),
    ("clap_score", "CLAP", "{:.3f}"),
    ("fad", "FAD", "{:.3f}"),
)


def markdown_table(report: dict) -> str:
    """One row per task, one column per metric ('—': not applicable or not computed; WER and
    CER in percent, as Seed-TTS-eval reports them; fractions in eval.json), then the reason for
    every skipped metric and the per-task notes."""
    lines = ["| task | " + " | ".join(h for _, h, _ in _COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for task, m in report["tasks"].items():
        cells = []
        for key, _, fmt in _COLUMNS:
            v = m.get(key)
            if v is None:
                cells.append("—")
            else:
                cells.append(fmt.format(v * 100 if key in ("wer", "cer") else v))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    skipped = [f"- {k}: {v}" for k, v in report["skipped"].items()]
    notes = [f"- {k} ({t}): {v}" for t, n in report.get("notes", {}).items() for k, v in n.items()]
    if skipped:
        lines += ["", "Not computed:", *skipped]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """eval.json (everything) and eval.md (the table) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=float) + "\n")
    (out / "eval.md").write_text(markdown_table(report), encoding="utf-8")
    return out / "eval.json", out / "eval.md"
