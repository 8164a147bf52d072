"""Evaluate a checkpoint folder from paths (what `jobs/evaluate.py` runs): load the model, its
tokenizer, the DAC, the judges with local weights and a voice library, run the harness on shard
rows or a task file, write the report. Torch only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.data.shards import ShardPathError
from unimoe_ray.eval.harness import EvalConfig, EvalError, run_eval
from unimoe_ray.eval.judges import load_judges
from unimoe_ray.eval.report import write_report
from unimoe_ray.inference.tasks import TaskError
from unimoe_ray.inference.voices import VoiceLibrary
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.text.tokenizer import load_tokenizer

# Errors of the inputs (a bad option, path or task file): one line for the user, no traceback.
INPUT_ERRORS = (EvalError, ShardPathError, TaskError, FileNotFoundError)


def sampling_options(text: str) -> dict:
    """--sampling's JSON object of SamplingConfig overrides, e.g. '{"min_frames": 50}' (EvalConfig
    checks the names)."""
    example = """e.g. '{"min_frames": 50}'"""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise EvalError(f"--sampling {text!r} is not JSON ({err}); give an object, {example}") from None
    if not isinstance(options, dict):
        raise EvalError(f"--sampling {text!r}: give a JSON object of SamplingConfig fields, {example}")
    return options


def evaluate_checkpoint(
    checkpoint: str | Path,
    cfg: EvalConfig,
    out: str | Path,
    *,
    shards: list[str | Path] | None = None,
    task_file: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dac_path: str | Path | None = None,
    judge_paths: dict[str, str | None] | None = None,
    voice_library: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """Evaluate `checkpoint` (save_pretrained layout or the released checkpoint) on `shards` or
    `task_file` (exactly one) and write OUT/eval.json and OUT/eval.md; returns their paths.

    tokenizer: its folder (default: the checkpoint folder); dac_path: DAC 16 kHz weights (default:
    $UNIMOE_DAC_PATH); judge_paths: local weights per judge (asr, speaker, utmos, clap), a judge
    without any is skipped with the reason; voice_library: prompt_audios.json for task files that
    name voices; dtype: the model's (default: the checkpoint's)."""
    model = load_pretrained(checkpoint, dtype=dtype, device=device)
    prompts = PromptBuilder(load_tokenizer(tokenizer or checkpoint), model.cfg)
    judges = load_judges(**(judge_paths or {}), device=device)
    voices = VoiceLibrary.load(voice_library) if voice_library else None
    codec = DACCodec.load(dac_path, device=device)
    report = run_eval(model, prompts, codec, judges, cfg, shards=shards, task_file=task_file, voices=voices, log=log)
    report["checkpoint"] = str(checkpoint)
    return write_report(report, out)
