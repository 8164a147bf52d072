"""Shard rows → training examples → token-capped batches. Torch only (no Ray).

A training row is the inference prompt (unimoe_ray.text.prompts.PromptBuilder, so training and
generation see the same tokens) followed by the target audio in the delay pattern, exactly as
`generate` feeds it back: right after <|AUDIO_START|> one <|AUDIO_PLACEHOLDER|> carries a BOS
frame whose output predicts delayed step 0, then one placeholder per delayed step s carrying
step s, whose output predicts step s + 1. With frames (K, T) and S = T + max_delay + 1 steps:

    ids     … <|AUDIO_START|>  PH     PH      …  PH
    codes   (prompt/pad)       BOS    step0   …  step S-2
    labels  IGNORE             step0  step1   …  step S-1   (BOS/PAD steps → IGNORE_INDEX)

Batches are capped by padded tokens (rows × longest row ≤ max_tokens), not rows: speech and
music clips differ ~10× in length. Within a shuffle window, rows are sorted by length before
packing (little padding) and the batches are then shuffled, all from a seed, so a worker's
batch sequence is a pure function of (its rows, seed, epoch): resuming replays it exactly.

Shape legend: B batch, L length, K codebooks, T frames, S delayed steps, N video patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.config import ModelConfig
from unimoe_ray.data.schema import codes_of, frames_of
from unimoe_ray.media.video import frames_to_patches
from unimoe_ray.model.unimoe_audio import IGNORE_INDEX, mrope_position_ids
from unimoe_ray.tasks import SPEECH_TASKS
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.train.config import TrainConfig


@dataclass(frozen=True)
class Example:
    """One training row. ids_L, codes_KL, labels_KL are aligned; pixel_values/grid_thw only for
    video-to-music."""

    sample_id: str
    task: str
    ids_L: torch.Tensor
    codes_KL: torch.Tensor
    labels_KL: torch.Tensor
    pixel_values: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.ids_L.numel())


@dataclass
class Batch:
    """A padded micro-batch (right padding). position_ids_3BL only when there is video."""

    input_ids_BL: torch.Tensor
    audio_codes_BKL: torch.Tensor
    labels_BKL: torch.Tensor
    attention_mask_BL: torch.Tensor
    sample_ids: list[str]
    tasks: list[str]
    position_ids_3BL: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(self.attention_mask_BL.sum())

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)

    def model_kwargs(self) -> dict:
        return dict(
            input_ids_BL=self.input_ids_BL,
            audio_codes_BKL=self.audio_codes_BKL,
            attention_mask_BL=self.attention_mask_BL,
            position_ids_3BL=self.position_ids_3BL,
            pixel_values_videos=self.pixel_values,
            video_grid_thw=self.video_grid_thw,
            labels_BKL=self.labels_BKL,
        )


class ExampleBuilder:
    """Shard row (dict, schema of unimoe_ray.data.schema) → Example."""

    def __init__(self, prompts: PromptBuilder, cfg: ModelConfig) -> None:
        self.prompts = prompts
        self.cfg = cfg
        self.pattern = DelayPattern(cfg.codec_delay_pattern, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad)

    def prompt(self, row: dict):
        task = row["task"]
        text = str(row["text"])
        if task in SPEECH_TASKS:
            return self.prompts.tts(text)
        if task == "t2m":
            return self.prompts.music(text)
        if task == "v2m":
            if self.cfg.vision is None:
                raise ValueError("a v2m row needs a model with a vision tower (config.vision is None)")
            v = self.cfg.vision
            pixel_values, grid = frames_to_patches(
                frames_of(row),
                patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size,
                merge_size=v.spatial_merge_size,
            )
            return self.prompts.music(text, video=(torch.from_numpy(pixel_values), torch.from_numpy(grid)))
        raise ValueError(f"row {row.get('sample_id')}: unknown task {task!r}")

    def __call__(self, row: dict) -> Example:
        try:
            prompt = self.prompt(row)
            codes_KT = torch.from_numpy(codes_of(row))
            delayed_KS = self.pattern.apply(codes_KT)
        except ValueError as err:
            raise ValueError(f"shard row {row.get('sample_id')} ({row.get('task')}): {err}") from err
        K, S = delayed_KS.shape
        L_p = prompt.input_ids_L.numel()
        prompt_codes_KL = prompt.audio_codes_KL
        if prompt_codes_KL is None:
            prompt_codes_KL = torch.full((K, L_p), self.cfg.codec_pad, dtype=torch.long)
        bos_K1 = torch.full((K, 1), self.cfg.codec_bos, dtype=torch.long)
        ids_L = torch.cat([prompt.input_ids_L, torch.full((S,), self.cfg.codec_placeholder_id, dtype=torch.long)])
        codes_KL = torch.cat([prompt_codes_KL, bos_K1, delayed_KS[:, : S - 1]], dim=1)
        labels_KL = torch.cat(
            [torch.full((K, L_p), IGNORE_INDEX, dtype=torch.long), self.pattern.labels(delayed_KS)], dim=1
        )
        grid = None if prompt.video_grid_thw is None else prompt.video_grid_thw.view(-1, 3)
        return Example(
            sample_id=str(row["sample_id"]),
            task=str(row["task"]),
            ids_L=ids_L,
            codes_KL=codes_KL,
            labels_KL=labels_KL,
            pixel_values=prompt.pixel_values,
            grid_thw=grid,
        )


def split_rows(index: list[dict], train: TrainConfig, *, val_fraction: float = 0.1) -> tuple[dict[str, int], set[str]]:
    """Per-task row counts and the validation sample ids, by whole source clip (`source_id`):
    a music clip's windows all fall on one side, so validation never scores a window of a clip
    that training saw. Per task, clips in source-id order (a hash: a fixed random subset) join
    validation until it holds min(val_max_rows, val_fraction of the task's rows, at least 1)
    rows; a clip that would overshoot is skipped once validation holds a row, at least one
    clip stays in training, and a task with a single clip gets no validation."""
    by_task: dict[str, dict[str, list[str]]] = {}
    for r in index:
        if "source_id" not in r:
            raise ValueError(
                f"row {r.get('sample_id')} has no source_id: validation is split by source clip; use "
                "shards written by jobs/preprocess.py (their schema carries it)"
            )
        by_task.setdefault(r["task"], {}).setdefault(r["source_id"], []).append(r["sample_id"])
    counts = {t: sum(len(ids) for ids in clips.values()) for t, clips in by_task.items()}
    val: set[str] = set()
    if train.val_every > 0:
        for t in train.tasks:
            clips = by_task.get(t, {})
            want = min(train.val_max_rows, max(1, int(counts.get(t, 0) * val_fraction + 1e-9)))
            taken = 0
            for src in sorted(clips)[: len(clips) - 1]:
                if taken >= want:
                    break
                if taken and taken + len(clips[src]) > want:
                    continue
                val.update(clips[src])
                taken += len(clips[src])
    return counts, val


def collate(examples: list[Example], cfg: ModelConfig) -> Batch:
    """Right-pad examples into one Batch (pad: id 0, codec PAD, label IGNORE_INDEX)."""
    if not examples:
        raise ValueError("collate() got no examples")
    B, K = len(examples), cfg.codec_channels
    L = max(e.length for e in examples)
    ids_BL = torch.zeros(B, L, dtype=torch.long)
    codes_BKL = torch.full((B, K, L), cfg.codec_pad, dtype=torch.long)
    labels_BKL = torch.full((B, K, L), IGNORE_INDEX, dtype=torch.long)
    mask_BL = torch.zeros(B, L, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = e.length
        ids_BL[b, :n] = e.ids_L
        codes_BKL[b, :, :n] = e.codes_KL
        labels_BKL[b, :, :n] = e.labels_KL
        mask_BL[b, :n] = True
    batch = Batch(
        input_ids_BL=ids_BL,
        audio_codes_BKL=codes_BKL,
        labels_BKL=labels_BKL,
        attention_mask_BL=mask_BL,
        sample_ids=[e.sample_id for e in examples],
        tasks=[e.task for e in examples],
    )
    videos = [e for e in examples if e.pixel_values is not None]
    if videos:
        batch.pixel_values = torch.cat([e.pixel_values for e in videos])
        batch.video_grid_thw = torch.cat([e.grid_thw for e in videos])
        batch.position_ids_3BL = mrope_position_ids(
            ids_BL,
            video_token_id=cfg.video_token_id,
            video_grid_thw=batch.video_grid_thw,
            spatial_merge_size=cfg.vision.spatial_merge_size,
            attention_mask_BL=mask_BL,
        )
    return batch


def pack_by_tokens(examples: list[Example], max_tokens: int) -> list[list[Example]]:
    """Greedy packing in the given order: a batch grows while rows × longest row ≤ max_tokens."""
    batches: list[list[Example]] = []
    current: list[Example] = []
    longest = 0
    for e in examples:
        if e.length > max_tokens:
            raise ValueError(
                f"row {e.sample_id} ({e.task}) has {e.length} tokens, more than max_tokens="
                f"{max_tokens}: raise --max-tokens or cut long clips shorter in preprocessing "
                "(--music-window-s)"
            )
        new_longest = max(longest, e.length)
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], e.length
        current.append(e)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def epoch_batches(
    windows: Iterable[list[dict]],
    build: Callable[[dict], Example],
    *,
    max_tokens: int,
    seed: int,
    epoch: int,
    rank: int,
) -> Iterator[list[Example]]:
    """One epoch of a worker's rows (given as consecutive windows of row dicts) → batches.

    Per window: build examples, sort by length (ties: a seeded permutation), pack, shuffle the
    batch order with the same seeded generator."""
    for w, rows in enumerate(windows):
        rng = np.random.default_rng([seed, epoch, rank, w])
        examples = [build(r) for r in rows]
        perm = rng.permutation(len(examples))
        order = sorted(range(len(examples)), key=lambda i: (examples[i].length, perm[i]))
        batches = pack_by_tokens([examples[i] for i in order], max_tokens)
        for i in rng.permutation(len(batches)):
            yield batches[i]


@dataclass
class DataPosition:
    """How far a worker is in its infinite batch stream: `consumed` micro-batches in all, of
    which `in_epoch` belong to the current `epoch`. Every worker consumes one micro-batch per
    micro-step, so `consumed` is the same on all workers and is what a checkpoint records."""

    consumed: int = 0
    epoch: int = 0
    in_epoch: int = 0


def batch_stream(
    read_epoch: Callable[[], Iterable[list[dict]]],
    build: Callable[[dict], Example],
    *,
    max_tokens: int,
    seed: int,
    rank: int,
    start: int = 0,
    position: DataPosition | None = None,
) -> Iterator[list[Example]]:
    """Epoch after epoch of `epoch_batches`, skipping the first `start` batches (resume).

    `read_epoch()` returns one epoch of this worker's rows in windows (always the same rows in
    the same order). `position` (if given) is updated as batches are yielded."""
    pos = position if position is not None else DataPosition()
    epoch = 0
    consumed = 0
    while True:
        produced = 0
        for in_epoch, batch in enumerate(
            epoch_batches(read_epoch(), build, max_tokens=max_tokens, seed=seed, epoch=epoch, rank=rank)
        ):
            produced += 1
            consumed += 1
            if consumed <= start:
                continue
            pos.consumed, pos.epoch, pos.in_epoch = consumed, epoch, in_epoch + 1
            yield batch
        if produced == 0:
            raise ValueError(
                f"worker {rank} has no training rows: its dataset shard is empty. Use fewer "
                "workers (--num-workers) or more data"
            )
        epoch += 1
