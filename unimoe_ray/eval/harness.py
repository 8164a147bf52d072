"""The evaluation harness: a model (+ tokenizer + DAC) on validation rows or a task file, per
task (tts_zh, tts_en, t2m, v2m), torch only.

Weight-free metrics (need only the model and the codec):
- teacher-forced CE and top-1 accuracy per codebook, on shard rows built exactly as training
  builds them (`train.batches.ExampleBuilder` / `collate`) and run through the training loss
  path (`train.step.LossModule`): `ce` is the CE term of the training loss (Σ_k mean CE_k);
- experts per token: routed experts per real (unpadded) token of the rows, prompt and audio
  alike, mean over MoE layers, and the null-expert share (from the same forwards, as
  jobs/analyze_routing.py counts them; a dense model has none);
- generation (`inference.generate.generate`, the released decoding rules and per-task
  defaults): duration error against the requested length, EOS rate (generations that ended
  by EOS, not by the length limit), silence and clipping ratios of the decoded audio
  (`data.quality`'s scorers).
Model-based metrics (eval/judges.py, weights from local paths): WER (tts_en) / CER (tts_zh),
speaker similarity and UTMOS for speech; CLAP score and FAD for music.

The requested length of an item: a shard row's own length (its target clip); a task-file
item's `duration_s` (or its sampling `max_frames`). Its frame limit is `length_slack` × that
(unless the sampling options set max_frames), so an over-long generation shows as a positive
duration error and a model that never stops as an EOS rate below 1. References for speaker
similarity and FAD: a shard row's target clip (its codes decoded by the same DAC), a task's
prompt voice (Seed-TTS-eval's SIM: prompt voice vs output).

Shape legend: T labelled positions, K codebooks, V codec vocab, N clips, D embedding dim.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.audio.io import read_audio, resample
from unimoe_ray.data.config import TASKS
from unimoe_ray.data.quality import ClippingScorer, SilenceScorer
from unimoe_ray.data.schema import codes_of
from unimoe_ray.data.shards import shard_paths
from unimoe_ray.eval import metrics
from unimoe_ray.eval.judges import SIMPLIFIES_ZH, Judges
from unimoe_ray.inference.generate import generate
from unimoe_ray.inference.sampling import task_sampling
from unimoe_ray.inference.tasks import TaskError, TaskRequest, read_task_file
from unimoe_ray.inference.video import VideoSampling, load_video
from unimoe_ray.inference.voices import VoiceLibrary
from unimoe_ray.model.unimoe_audio import IGNORE_INDEX, UniMoEAudio
from unimoe_ray.tasks import MUSIC_TASKS, SPEECH_TASKS, sampling_task
from unimoe_ray.text.prompt import Prompt
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.train.batches import ExampleBuilder, collate, pack_by_tokens
from unimoe_ray.train.routing import RoutingTally
from unimoe_ray.train.step import LossModule

SPEECH_LANG = {"tts_en": "en", "tts_zh": "zh"}
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


class EvalError(ValueError):
    """Evaluation inputs that cannot work; the message names the cause and the fix."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    rows_per_task: int = 16  # shard rows per task: the first in sample-id order, as training's validation split
    max_tokens: int = 4096  # padded tokens per teacher-forced batch
    generate: bool = True
    gen_batch: int = 4  # prompts per generate() call
    length_slack: float = 2.0  # frame limit = slack × requested length
    sampling: dict = field(default_factory=dict)  # SamplingConfig overrides for every generation
    seed: int = 0  # item i samples with seed + i

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise EvalError(f"tasks {list(self.tasks)}: use one or more of {', '.join(TASKS)}")
        if self.rows_per_task < 1 or self.gen_batch < 1 or self.max_tokens < 16:
            raise EvalError("rows_per_task and gen_batch must be >= 1, max_tokens >= 16")
        if not self.length_slack >= 1.0:
            raise EvalError(f"length_slack={self.length_slack}: must be >= 1 (the limit may not cut the request)")
        try:
            task_sampling("speech", **self.sampling)
        except (TypeError, ValueError) as err:
            raise EvalError(
                f"sampling options {self.sampling}: {err} (use fields of inference.sampling.SamplingConfig)"
            ) from None


# ---- inputs ----


def read_rows(shards: list[str | Path], tasks: tuple[str, ...], rows_per_task: int) -> dict[str, list[dict]]:
    """Per task, the first `rows_per_task` rows in sample-id order (a fixed random subset).
    Training holds out whole source clips (`train.batches.split_rows`), so these are not its
    validation rows: pass those as `run_eval(rows=...)` to evaluate on them."""
    ds = pads.dataset(shard_paths(shards), format="parquet")
    index = ds.to_table(columns=["sample_id", "task"]).to_pylist()
    chosen = {t: sorted(r["sample_id"] for r in index if r["task"] == t)[:rows_per_task] for t in tasks}
    ids = [i for v in chosen.values() for i in v]
    if not ids:
        found = sorted({r["task"] for r in index})
        raise EvalError(f"the shards hold no rows of tasks {list(tasks)} (they hold {found})")
    rows = ds.to_table(filter=pc.field("sample_id").isin(ids)).to_pylist()
    by_id = {r["sample_id"]: r for r in rows}
    return {t: [by_id[i] for i in v] for t, v in chosen.items() if v}


@dataclass
class EvalItem:
    """One generation to judge. reference_wav (at the codec rate) is the speaker-similarity
    and FAD reference; sampling: this item's own SamplingConfig overrides."""

    item_id: str
    task: str
    text: str
    prompt: Prompt
    negative: Prompt
    requested_frames: int | None
    reference_wav: np.ndarray | None = None
    reference_kind: str = ""  # what reference_wav is, recorded beside the scores
    sampling: dict = field(default_factory=dict)


def items_from_rows(
    rows_by_task: dict[str, list[dict]], prompts: PromptBuilder, codec: DACCodec, *, with_reference: bool
) -> list[EvalItem]:
    """Shard rows → items: the training prompt (`ExampleBuilder.prompt`), its negative, and the
    row's own length as the request."""
    build = ExampleBuilder(prompts, prompts.cfg)
    items = []
    for task, rows in rows_by_task.items():
        for row in rows:
            prompt = build.prompt(row)
            if task in SPEECH_TASKS:
                negative = prompts.tts_negative()
            else:
                video = None if prompt.pixel_values is None else (prompt.pixel_values, prompt.video_grid_thw)
                negative = prompts.music_negative(video=video)
            ref = codec.decode(torch.from_numpy(codes_of(row))) if with_reference else None
            items.append(
                EvalItem(
                    item_id=str(row["sample_id"]),
                    task=task,
                    text=str(row["text"]),
                    prompt=prompt,
                    negative=negative,
                    requested_frames=int(row["n_frames"]),
                    reference_wav=ref,
                    reference_kind="target clip (its codes decoded)",
                )
            )
    return items


def _speech_task(item: dict, text: str) -> str:
    lang = str(item.get("language", "zh" if _CJK.search(text) else "en"))
    if lang not in ("zh", "en"):
        raise TaskError(f"task {item.get('task_id')}: language {lang!r}; use 'en' or 'zh'")
    return f"tts_{lang}"


def items_from_task_file(
    path: str | Path,
    prompts: PromptBuilder,
    codec: DACCodec,
    tasks: tuple[str, ...],
    *,
    voices: VoiceLibrary | None = None,
    video_sampling: VideoSampling = VideoSampling(),
) -> list[EvalItem]:
    """A released-style task file (inference/tasks.py) → items. Optional keys beside the
    released ones: `duration_s` (the requested length) and `language` ("en" | "zh"; default:
    zh when the text holds CJK characters)."""
    path = Path(path)
    items = []
    for i, raw in enumerate(read_task_file(path)):
        if "_error" in raw:
            raise TaskError(f"task file {path}: {raw['_error']}")
        req = TaskRequest.from_released(raw, i, base=path.parent)
        req.check(voices)
        task = _speech_task(raw, req.text) if req.task == "tts" else req.task
        if task not in tasks:
            continue
        ref = None
        if req.task == "tts":
            if req.voice is not None:
                v = voices.get(req.voice)
                ref_path, ref_text = v.audio_path, v.transcript
            else:
                ref_path, ref_text = req.reference_audio, req.reference_text
            wav, sr = read_audio(ref_path)
            kw = dict(prompt_text=ref_text, prompt_codes_KT=codec.encode(wav, sr))
            prompt, negative = prompts.tts(req.text, **kw), prompts.tts_negative(**kw)
            ref = resample(wav, sr, codec.sample_rate)
        else:
            video = load_video(req.video_path, prompts.cfg.vision, video_sampling) if req.task == "v2m" else None
            prompt, negative = prompts.music(req.text, video=video), prompts.music_negative(video=video)
        seconds = raw.get("duration_s")
        if seconds is not None and not float(seconds) > 0:
            raise TaskError(f"task {req.task_id}: duration_s={seconds}: the requested length must be > 0 seconds")
        requested = round(float(seconds) * codec.frame_rate) if seconds is not None else req.sampling.get("max_frames")
        items.append(
            EvalItem(
                item_id=req.task_id,
                task=task,
                text=req.text,
                prompt=prompt,
                negative=negative,
                requested_frames=requested,
                reference_wav=ref,
                reference_kind="prompt voice",
                sampling=req.sampling,
            )
        )
    if not items:
        raise EvalError(f"task file {path} holds no task of {list(tasks)}")
    return items


# ---- teacher forcing ----


@torch.no_grad()
def teacher_forced(model: UniMoEAudio, prompts: PromptBuilder, rows: list[dict], max_tokens: int) -> dict:
    """CE / accuracy per codebook and routing statistics of one task's rows, through the
    training loss path. The codec logits are taken where `LossModule` computes them (a hook
    on `codec_head`: it runs once per forward, on the labelled positions only)."""
    cfg = model.cfg
    K, V = cfg.codec_channels, cfg.codec_vocab_size
    device = model.codec_head.weight.device
    build = ExampleBuilder(prompts, cfg)
    loss = LossModule(model)
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    hook = model.codec_head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    tally, routing = metrics.CodebookTally.empty(K), RoutingTally.empty(cfg)
    try:
        for group in pack_by_tokens([build(r) for r in rows], max_tokens):
            batch = collate(group, cfg).to(device)
            captured.clear()
            _, _, _, stats = loss(batch)
            if len(captured) != 1:
                raise RuntimeError(f"codec_head ran {len(captured)} times in one loss forward; expected once")
            # LossModule's own selection: positions with at least one codebook labelled.
            labels_TK = batch.labels_BKL.transpose(1, 2).reshape(-1, K)
            labels_TK = labels_TK[(labels_TK != IGNORE_INDEX).any(-1)]
            tally.add(metrics.codebook_tally(captured[0].view(-1, K, V), labels_TK))
            routing.add(stats, batch.attention_mask_BL.reshape(-1).cpu())
    finally:
        hook.remove()
        model.train(was_training)
    out = {"rows": len(rows), **tally.summary()}
    if routing.tokens_Y.numel():
        n_Y = routing.tokens_Y.clamp_min(1.0)
        per_layer = (routing.routed_sum_Y / n_Y).tolist()
        out["experts_per_token"] = float(np.mean(per_layer))
        out["experts_per_token_per_layer"] = [round(v, 4) for v in per_layer]
        out["null_share"] = float((routing.null_tokens_Y / n_Y).mean())
    return out


# ---- generation ----


@dataclass
class Generated:
    item: EvalItem
    codes_KT: torch.Tensor
    wav: np.ndarray
    frame_limit: int


def generate_items(
    model: UniMoEAudio, codec: DACCodec, items: list[EvalItem], cfg: EvalConfig, log: Callable[[str], None] = print
) -> list[Generated]:
    """Generate every item (batches of `gen_batch` items of one task) and decode it."""
    max_delay = max(model.cfg.codec_delay_pattern)
    out: list[Generated] = []
    for task in dict.fromkeys(it.task for it in items):
        group = [it for it in items if it.task == task]
        for start in range(0, len(group), cfg.gen_batch):
            chunk = group[start : start + cfg.gen_batch]
            configs = []
            for it in chunk:
                over = {**cfg.sampling, **it.sampling}
                if it.requested_frames and "max_frames" not in over:
                    over["max_frames"] = max(1, math.ceil(cfg.length_slack * it.requested_frames))
                # generate() seeds row c with seed + c: every row gets seed + start, so item i of
                # a task samples with seed + i whatever the batch size.
                over.setdefault("seed", cfg.seed + start)
                configs.append(task_sampling(sampling_task(task), **over))
            codes = generate(model, [it.prompt for it in chunk], [it.negative for it in chunk], configs)
            for it, c_KT, s in zip(chunk, codes, configs):
                wav = codec.decode(c_KT) if c_KT.shape[1] else np.zeros(0, np.float32)
                out.append(Generated(it, c_KT, wav, s.frame_limit(max_delay)))
        log(f"[eval] {task}: generated {len(group)} clip(s)")
    return out


def _judge_item(g: Generated, judges: Judges, sr: int, frame_rate: float) -> dict:
    it = g.item
    frames = int(g.codes_KT.shape[1])
    rec = {
        "item_id": it.item_id,
        "task": it.task,
        "frames": frames,
        "frame_limit": g.frame_limit,
        "requested_frames": it.requested_frames,
        "ended_by_eos": metrics.ended_by_eos(frames, g.frame_limit),
        "silence_ratio": SilenceScorer().score(g.wav, sr),
        "clipping_ratio": ClippingScorer().score(g.wav, sr),
    }
    if it.requested_frames:
        rec["duration"] = metrics.duration_error(frames, it.requested_frames, frame_rate)
    if g.wav.size == 0:
        return rec  # nothing for a model judge to hear
    if it.task in SPEECH_LANG:
        lang = SPEECH_LANG[it.task]
        if judges.asr is not None:
            rec["hypothesis"] = judges.asr.transcribe(g.wav, sr, lang)
            rec["cer" if lang == "zh" else "wer"] = metrics.utterance_error_rate(it.text, rec["hypothesis"], lang)
        if judges.speaker is not None and it.reference_wav is not None:
            ref_D = judges.speaker.embed(it.reference_wav, sr)
            rec["speaker_sim"] = metrics.cosine(ref_D, judges.speaker.embed(g.wav, sr))
            rec["speaker_sim_reference"] = it.reference_kind
        if judges.utmos is not None:
            rec["utmos"] = judges.utmos.score(g.wav, sr)
    elif judges.clap is not None:
        rec["clap_embedding"] = judges.clap.audio_embed(g.wav, sr)
        rec["clap_score"] = metrics.cosine(judges.clap.text_embed(it.text), rec["clap_embedding"])
    return rec


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def generation_summary(records: list[dict], items: list[EvalItem], judges: Judges, sr: int) -> tuple[dict, dict]:
    """Aggregates per task, and per-task reasons for metrics that could not be computed."""
    out, notes = {}, {}
    for task in dict.fromkeys(r["task"] for r in records):
        recs = [r for r in records if r["task"] == task]
        durs = [r["duration"] for r in recs if "duration" in r]
        s = {
            "generated": len(recs),
            "eos_rate": metrics.eos_rate([r["frames"] for r in recs], [r["frame_limit"] for r in recs]),
            "mean_frames": float(np.mean([r["frames"] for r in recs])),
            "silence_ratio": _mean([r["silence_ratio"] for r in recs]),
            "clipping_ratio": _mean([r["clipping_ratio"] for r in recs]),
            "duration_abs_s": _mean([d["abs_s"] for d in durs]),
            "duration_signed_s": _mean([d["signed_s"] for d in durs]),
            "duration_rel": _mean([d["rel"] for d in durs]),
        }
        for key in ("wer", "cer", "speaker_sim", "utmos", "clap_score"):
            vals = [r[key] for r in recs if key in r]
            if vals:
                s[key] = _mean(vals)
        if task in MUSIC_TASKS and judges.clap is not None:
            gen_emb = [r["clap_embedding"] for r in recs if "clap_embedding" in r]
            refs = [
                it.reference_wav
                for it in items
                if it.task == task and it.reference_wav is not None and it.reference_wav.size
            ]
            if len(gen_emb) >= 2 and len(refs) >= 2:
                s["fad"] = metrics.fad(np.stack(gen_emb), np.stack([judges.clap.audio_embed(w, sr) for w in refs]))
                # FAD from few clips is biased upwards (covariances of N < D embeddings): say how many.
                s["fad_clips"] = [len(gen_emb), len(refs)]
            else:
                notes.setdefault(task, {})["fad"] = (
                    f"needs >= 2 generated and >= 2 reference clips (got {len(gen_emb)} and {len(refs)}); "
                    "task files carry no music references: evaluate on shard rows"
                )
        out[task] = {k: v for k, v in s.items() if v is not None}
    for r in records:
        r.pop("clap_embedding", None)
    return out, notes


# ---- the whole run ----


def run_eval(
    model: UniMoEAudio,
    prompts: PromptBuilder,
    codec: DACCodec,
    judges: Judges,
    cfg: EvalConfig,
    *,
    shards: list[str | Path] | None = None,
    task_file: str | Path | None = None,
    rows: dict[str, list[dict]] | None = None,
    voices: VoiceLibrary | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate on shard rows (teacher forcing + generation) or a task file (generation only).
    `rows` (task → shard rows, e.g. a training run's validation split) replaces `shards` when
    the caller has chosen the rows itself (`cfg.rows_per_task` then does not apply).
    Returns the report (eval/report.py writes it): per-task metrics, per-item records, every
    skipped metric's reason and per-task notes."""
    if sum(x is not None for x in (shards, task_file, rows)) != 1:
        raise EvalError("give validation shards, shard rows or a task file (exactly one)")
    skipped = dict(judges.skipped)
    for metric, reason in skipped.items():
        log(f"[eval] skipping {metric}: {reason}")
    tasks: dict[str, dict] = {}
    if task_file is None:
        if rows is None:
            rows = read_rows(shards, cfg.tasks, cfg.rows_per_task)
        rows = {t: r for t, r in rows.items() if t in cfg.tasks and r}
        for t in cfg.tasks:
            if t not in rows:
                log(f"[eval] no rows of {t} in the shards: {t} is not evaluated")
        for t, r in rows.items():
            tasks[t] = teacher_forced(model, prompts, r, cfg.max_tokens)
            log(f"[eval] {t}: teacher-forced on {len(r)} row(s), CE {tasks[t]['ce']:.4f}")
        need_ref = judges.speaker is not None or judges.clap is not None
        items = items_from_rows(rows, prompts, codec, with_reference=need_ref and cfg.generate) if cfg.generate else []
    else:
        skipped["teacher_forced"] = (
            "a task file has no target codes (evaluate on shard rows for CE, accuracy, experts per token)"
        )
        items = items_from_task_file(task_file, prompts, codec, cfg.tasks, voices=voices)
    if cfg.generate:
        records = [
            _judge_item(g, judges, codec.sample_rate, codec.frame_rate)
            for g in generate_items(model, codec, items, cfg, log)
        ]
        summary, notes = generation_summary(records, items, judges, codec.sample_rate)
        for t, s in summary.items():
            tasks.setdefault(t, {}).update(s)
    else:
        records, notes = [], {}
        skipped["generation"] = "generation turned off (--no-generate)"
    if judges.asr is not None and "tts_zh" in tasks and not SIMPLIFIES_ZH:
        notes.setdefault("tts_zh", {})["cer"] = (
            "hypotheses not converted to simplified characters (Seed-TTS-eval does it with zhconv, not installed)"
        )
    if model.cfg.moe.mode == "dense":
        skipped["experts_per_token"] = "a dense model has no router"
    return {"tasks": tasks, "items": records, "skipped": skipped, "notes": notes}
