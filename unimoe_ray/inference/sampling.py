"""Sampling one codec frame per row, as the released UniMoE-Audio `generate` does
(docs/DESIGN.md §1 "Decoding"; released `UniMoE_Audio_model.py` `_decoder_step` /
`_sample_next_token`), with per-row knobs so that one batch can hold requests with different
settings (the serving engine's continuous batching) and per-row random generators so that a
request's codes depend on its seed only, not on its neighbours in the batch.

Order of operations on the fp32 logits of a row, step s (0 = the first generated frame):
1. guidance: cond + scale · (cond − uncond);
2. BOS/PAD never sampled; EOS only on codebook 0, and only from s ≥ min_frames;
3. codebook 0's EOS logit × eos_factor (a logit factor: it raises a negative logit);
4. greedy rows: argmax here;
5. ÷ temperature;
6. EOS stays only where it is the highest logit;
7. top-k keeps exactly k (torch.topk);
8. top-p drops a token when the sorted mass before it is strictly above p (skipped at p = 1);
9. sample from the softmax.

Shape legend: C rows, K codebooks, V codec vocab (1027).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

Task = Literal["speech", "music", "v2m"]

SEED_MAX = 2**63 - 1  # row generators seed with seed + row: stays inside torch's 64-bit range
FP32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32: the engine divides in fp32
TEMPERATURE_MAX = 100.0


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Decoding knobs of one request. Defaults are the released speech defaults; use
    `task_sampling(task)` for a task's released defaults."""

    guidance_scale: float = 1.0  # 0 runs no unconditional row
    top_k: int = 45
    top_p: float = 1.0
    temperature: float = 1.0
    eos_factor: float = 1.0  # × codebook 0's EOS logit after guidance, before temperature
    min_frames: int = 100  # EOS forbidden before this many frames (released: 2 s speech)
    max_tokens: int = 1000  # released length rule: at most max_tokens − max_delay − 1 frames
    max_frames: int | None = None  # an extra cap on frames (None: the released rule alone)
    greedy: bool = False  # argmax (the released do_sample=False / temperature 0)
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        # Checked here, on the types the engine uses, so a knob that would fail deep in torch
        # (manual_seed overflow, an fp32 temperature that rounds to 0) is refused up front.
        for name in ("top_k", "min_frames", "max_tokens", "max_frames", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name}={value!r}: must be an integer")
        for name in ("guidance_scale", "top_p", "temperature", "eos_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: must be a finite number")
        if self.seed is not None and not (0 <= self.seed <= SEED_MAX):
            raise ValueError(f"seed={self.seed}: must be in [0, 2**63-1] (torch generators take 64-bit seeds)")
        if not self.greedy and not FP32_TINY <= self.temperature <= TEMPERATURE_MAX:
            raise ValueError(
                f"temperature={self.temperature}: must be a normal float32 in [{FP32_TINY:.3g}, {TEMPERATURE_MAX}] "
                "(or greedy decoding: temperature 0 in the API, greedy=True here)"
            )
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames={self.max_frames}: must be >= 1 (50 frames = 1 s)")
        if self.min_frames < 0:
            raise ValueError(f"min_frames={self.min_frames}: must be >= 0")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (or set greedy=True)")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale}: must be >= 0")
        if self.eos_factor < 0:
            raise ValueError(f"eos_factor={self.eos_factor}: must be >= 0")

    def frame_limit(self, max_delay: int) -> int:
        """Most frames this request may produce: the released rule (EOS forced at step
        max_tokens − max_delay, i.e. 981 frames for 1000 and delay 18) and max_frames."""
        limit = self.max_tokens - max_delay - 1
        if limit < 1:
            raise ValueError(
                f"max_tokens={self.max_tokens} leaves no frame after the delay pattern's {max_delay} "
                f"steps: use max_tokens > {max_delay + 1}"
            )
        return limit if self.max_frames is None else min(limit, self.max_frames)

    def replace(self, **changes) -> "SamplingConfig":
        return replace(self, **changes)


# The released task entry points (UniMoE_Audio_mod.py / web_demo.py): guidance 1 for speech,
# 10 for music; EOS logit factor 1.0 speech, 0.6 music; minimum 2 s speech, 8 s music.
TASK_DEFAULTS: dict[str, SamplingConfig] = {
    "speech": SamplingConfig(guidance_scale=1.0, eos_factor=1.0, min_frames=100),
    "music": SamplingConfig(guidance_scale=10.0, eos_factor=0.6, min_frames=400),
    "v2m": SamplingConfig(guidance_scale=10.0, eos_factor=0.6, min_frames=400),
}


def task_sampling(task: str, **overrides) -> SamplingConfig:
    """The released defaults of a task ("speech", "music", "v2m"), with overrides."""
    if task not in TASK_DEFAULTS:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(TASK_DEFAULTS)}")
    return TASK_DEFAULTS[task].replace(**{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class RowKnobs:
    """SamplingConfigs of C rows stacked into tensors (one entry per row)."""

    guidance_C: torch.Tensor
    eos_factor_C: torch.Tensor
    temperature_C: torch.Tensor
    top_k_C: torch.Tensor
    top_p_C: torch.Tensor
    greedy_C: torch.Tensor
    min_frames_C: torch.Tensor

    @classmethod
    def stack(cls, configs: list[SamplingConfig], device: torch.device | str = "cpu") -> "RowKnobs":
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            guidance_C=t([s.guidance_scale for s in configs], torch.float32),
            eos_factor_C=t([s.eos_factor for s in configs], torch.float32),
            temperature_C=t([s.temperature if not s.greedy else 1.0 for s in configs], torch.float32),
            top_k_C=t([s.top_k for s in configs], torch.long),
            top_p_C=t([s.top_p for s in configs], torch.float32),
            greedy_C=t([s.greedy for s in configs], torch.bool),
            min_frames_C=t([s.min_frames for s in configs], torch.long),
        )


def row_generators(seeds: list[int | None], device: torch.device | str = "cpu") -> list[torch.Generator | None]:
    """One generator per row (None: torch's global generator)."""
    return [None if s is None else torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def process_logits(
    cond_CKV: torch.Tensor, uncond_CKV: torch.Tensor | None, knobs: RowKnobs, step_C: torch.Tensor, *, eos: int
) -> torch.Tensor:
    """Steps 1-3 and 5-8 above: the fp32 logits each row samples from (-inf = excluded).
    Greedy rows are not divided by temperature (their argmax is the same)."""
    logits_CKV = cond_CKV.float()
    if uncond_CKV is not None:
        g_C11 = knobs.guidance_C[:, None, None]
        logits_CKV = logits_CKV + g_C11 * (logits_CKV - uncond_CKV.float())
    else:
        logits_CKV = logits_CKV.clone()
    C, K, V = logits_CKV.shape
    logits_CKV[:, :, eos + 1 :] = float("-inf")  # PAD and BOS are written by the delay pattern
    logits_CKV[:, 1:, eos] = float("-inf")  # EOS only on codebook 0 (the countdown does the rest)
    eos_ok_C = step_C >= knobs.min_frames_C
    logits_CKV[:, 0, eos] = torch.where(eos_ok_C, logits_CKV[:, 0, eos] * knobs.eos_factor_C, float("-inf"))

    logits_CKV = logits_CKV / knobs.temperature_C[:, None, None]
    # EOS only where it is the highest logit (released `_sample_next_token`).
    eos_not_top_C = logits_CKV[:, 0].argmax(dim=-1) != eos
    logits_CKV[:, 0, eos] = logits_CKV[:, 0, eos].masked_fill(eos_not_top_C, float("-inf"))

    # Top-k: exactly k per row (ties broken by torch.topk, as released).
    k_max = int(knobs.top_k_C.clamp(max=V).max())
    idx_CKk = logits_CKV.topk(k_max, dim=-1).indices
    keep_k = torch.arange(k_max, device=logits_CKV.device) < knobs.top_k_C[:, None, None]
    drop_CKV = torch.ones_like(logits_CKV, dtype=torch.bool).scatter(-1, idx_CKk, ~keep_k.expand_as(idx_CKk))
    logits_CKV = logits_CKV.masked_fill(drop_CKV, float("-inf"))

    nucleus_C = knobs.top_p_C < 1.0
    if bool(nucleus_C.any()):
        probs_CKV = logits_CKV.softmax(dim=-1)
        sorted_CKV, order_CKV = probs_CKV.sort(dim=-1, descending=True)
        over_CKV = sorted_CKV.cumsum(dim=-1) > knobs.top_p_C[:, None, None]
        # Drop a token when the mass before it is already above p: shift by one, keep the first.
        drop_sorted = torch.roll(over_CKV, shifts=1, dims=-1)
        drop_sorted[..., 0] = False
        drop_sorted &= nucleus_C[:, None, None]
        drop_CKV = torch.zeros_like(drop_sorted).scatter(-1, order_CKV, drop_sorted)
        logits_CKV = logits_CKV.masked_fill(drop_CKV, float("-inf"))
    return logits_CKV


@dataclass(frozen=True)
class RowFailure:
    """A row that cannot be sampled this step. internal: the model's own logits were not
    finite (a model fault); else the request's knobs made them so (guidance, eos_factor or
    temperature overflowed fp32: the request's own fault)."""

    row: int
    message: str
    internal: bool


def sample_rows(
    cond_CKV: torch.Tensor,
    uncond_CKV: torch.Tensor | None,
    knobs: RowKnobs,
    step_C: torch.Tensor,
    generators: list[torch.Generator | None],
    *,
    eos: int,
) -> tuple[torch.Tensor, list[RowFailure]]:
    """One frame per row: (C, K) codes, and the rows that could not be sampled (NaN or +inf
    logits, or a codebook with no candidate left). Every operation before the per-row draw
    is row-wise, and each row draws from its own generator, so a failed row changes nothing
    for the others: their frames are those of a batch without it. A failed row's frame is
    undefined (the caller drops the row)."""
    logits_CKV = process_logits(cond_CKV, uncond_CKV, knobs, step_C, eos=eos)
    # Sampleable: no NaN, no +inf (softmax of +inf is NaN), a finite maximum in every codebook.
    bad_C = (logits_CKV.isnan() | (logits_CKV == float("inf"))).flatten(1).any(1)
    bad_C |= ~logits_CKV.amax(dim=-1).isfinite().all(1)
    failures: list[RowFailure] = []
    if bool(bad_C.any()):
        raw_ok_C = cond_CKV.isfinite().flatten(1).all(1)
        if uncond_CKV is not None:
            raw_ok_C &= uncond_CKV.isfinite().flatten(1).all(1) | (knobs.guidance_C == 0)
        for c in bad_C.nonzero().flatten().tolist():
            step = int(step_C[c])
            if not bool(raw_ok_C[c]):
                failures.append(RowFailure(c, f"the model produced non-finite logits at step {step}", True))
            else:
                failures.append(
                    RowFailure(
                        c,
                        (
                            f"the sampling knobs overflowed float32 at step {step} (guidance_scale="
                            f"{float(knobs.guidance_C[c]):g}, eos_factor={float(knobs.eos_factor_C[c]):g}, temperature="
                            f"{float(knobs.temperature_C[c]):g}): use a larger temperature or smaller factors"
                        ),
                        False,
                    )
                )
        logits_CKV = logits_CKV.masked_fill(bad_C[:, None, None], 0.0)  # any valid distribution
    probs_CKV = logits_CKV.softmax(dim=-1)
    frame_CK = logits_CKV.argmax(dim=-1)
    bad = set(f.row for f in failures)
    for c in range(frame_CK.shape[0]):
        if c not in bad and not bool(knobs.greedy_C[c]):
            frame_CK[c] = torch.multinomial(probs_CKV[c], 1, generator=generators[c]).squeeze(-1)
    return frame_CK, failures


def sample_frame(
    cond_CKV: torch.Tensor,
    uncond_CKV: torch.Tensor | None,
    knobs: RowKnobs,
    step_C: torch.Tensor,
    generators: list[torch.Generator | None],
    *,
    eos: int,
) -> torch.Tensor:
    """One frame per row: (C, K) codes; ValueError naming the first row that cannot be sampled."""
    frame_CK, failures = sample_rows(cond_CKV, uncond_CKV, knobs, step_C, generators, eos=eos)
    if failures:
        f = failures[0]
        raise ValueError(f"row {f.row}: {f.message}")
    return frame_CK


def apply_pattern_rules(
    frame_CK: torch.Tensor,
    step_C: torch.Tensor,
    eos_step_C: torch.Tensor,
    limit_C: torch.Tensor,
    delays_K: torch.Tensor,
    *,
    bos: int,
    eos: int,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the delay pattern forces on sampled frames (docs/DESIGN.md §1): BOS before a codebook's
    first frame; EOS on codebook 0 at the frame limit; after codebook 0's EOS at step T, at
    step T + j codebook c writes EOS if j == delay[c], PAD if j > delay[c].

    step_C: each row's step; eos_step_C: the step of codebook 0's EOS (-1: none yet);
    limit_C: each row's frame limit. Returns (frame_CK, eos_step_C).
    """
    running_C = eos_step_C < 0
    frame_CK = frame_CK.clone()
    at_limit_C = running_C & (step_C >= limit_C)
    frame_CK[:, 0] = torch.where(at_limit_C, eos, frame_CK[:, 0])
    eos_step_C = torch.where(running_C & (frame_CK[:, 0] == eos), step_C, eos_step_C)
    j_C1 = (step_C - eos_step_C)[:, None]
    counting_C1 = (eos_step_C >= 0)[:, None]
    frame_CK = torch.where(counting_C1 & (j_C1 == delays_K), eos, frame_CK)
    frame_CK = torch.where(counting_C1 & (j_C1 > delays_K), pad, frame_CK)
    frame_CK = torch.where(step_C[:, None] < delays_K, bos, frame_CK)
    return frame_CK, eos_step_C
