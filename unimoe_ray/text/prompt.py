"""`Prompt`: one tokenised prompt, the hand-off between the prompt formats (`text/prompts.py`
builds it) and generation (`inference/` consumes it). It lives here, below both, so that text
never imports inference (inference imports text, never the reverse).

Shape legend: L prompt length, K codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt. `audio_codes_KL` holds codec frames at placeholder positions
    (anything valid elsewhere); `pixel_values`/`video_grid_thw` feed the vision tower."""

    input_ids_L: torch.Tensor
    audio_codes_KL: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
