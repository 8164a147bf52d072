"""Model configuration: small frozen dataclasses, checked when built (ConfigError names the
field and the fix). The named sizes are in `unimoe_ray/presets` (`get_preset`); the released
checkpoint's `config.json` (a Hugging Face dict) is read and written by `unimoe_ray/config_hf.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Weighting = Literal["paper", "released"]
MoEMode = Literal["top_p", "top_k", "dense"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One DCMoE block (docs/DESIGN.md §1). Router logits are ordered [routed, null, shared]."""

    mode: MoEMode = "top_p"
    num_routed: int = 8
    num_null: int = 1
    num_shared: int = 2
    routed_intermediate: int = 2752
    shared_intermediate: int = 1376
    top_p: float = 0.7
    top_k: int = 2  # only for mode="top_k" (the paper's Unify-MoE ablation)
    dense_intermediate: int = 11008  # only for mode="dense" (specialists / Unify-Dense)
    weighting: Weighting = "released"
    fp32_gate: bool = True
    input_jitter: float = 0.01
    router_jitter: float = 0.01
    aux_weight_start: float = 0.025
    aux_weight_end: float = 0.001
    aux_weight_decay_steps: int = 10_000
    token_drop: bool = False
    # The released key: true (the preview's config.json) trains the router through the combine
    # weights and the aux loss only; false trains through SparseMixer picks (router.py).
    ignore_differentiable_router: bool = True
    capacity_factor: float = 6.0
    min_capacity: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("top_p", "top_k", "dense"):
            raise ConfigError(f"moe.mode={self.mode!r}: use 'top_p', 'top_k' or 'dense'")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"moe.top_p={self.top_p}: Top-P threshold must be in (0, 1] (the paper uses 0.7)")
        if self.weighting not in ("paper", "released"):
            raise ConfigError(f"moe.weighting={self.weighting!r}: use 'paper' or 'released'")
        if self.num_routed < 1 or self.num_null < 0 or self.num_shared < 0:
            raise ConfigError(
                f"moe experts: num_routed={self.num_routed} (>=1), num_null={self.num_null} "
                f"(>=0), num_shared={self.num_shared} (>=0)"
            )
        if self.mode == "top_k" and not (1 <= self.top_k <= self.num_dynamic):
            raise ConfigError(f"moe.top_k={self.top_k}: must be in [1, num_routed + num_null = {self.num_dynamic}]")
        if not self.ignore_differentiable_router and self.weighting != "released":
            raise ConfigError(
                "moe.ignore_differentiable_router=false trains through the released SparseMixer picks, "
                "which need weighting='released' (or set ignore_differentiable_router=true)"
            )
        if self.capacity_factor <= 0 or self.min_capacity < 1:
            raise ConfigError("moe.capacity_factor must be > 0 and moe.min_capacity >= 1")

    @property
    def num_dynamic(self) -> int:
        """Experts that Top-P chooses among: routed + null."""
        return self.num_routed + self.num_null

    @property
    def num_experts(self) -> int:
        """Router width: routed + null + shared."""
        return self.num_routed + self.num_null + self.num_shared

    def aux_weight(self, step: int) -> float:
        """Aux-loss weight at a training step: linear decay start → end, then constant."""
        if self.aux_weight_decay_steps <= 0:
            return self.aux_weight_end
        frac = min(max(step, 0) / self.aux_weight_decay_steps, 1.0)
        return self.aux_weight_start + frac * (self.aux_weight_end - self.aux_weight_start)


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Qwen2.5-VL vision tower; handed as-is to transformers' implementation."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    hidden_act: str = "silu"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The whole UniMoE-Audio model: Qwen2.5-VL-style trunk + DCMoE FFNs + DAC codec I/O."""

    hidden_size: int = 2048
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    # Rows of the text embedding and lm_head: text_config.vocab_size (151676 in the release).
    vocab_size: int = 151676
    # The released config.json's top-level `vocab_size` (151936) sizes no tensor; kept only so
    # a config read from disk writes back unchanged (None: same as vocab_size).
    hf_vocab_size: int | None = None
    max_position_embeddings: int = 128_000
    initializer_range: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    # Codec (DAC 16 kHz): 1024 codes + eos + pad + bos per codebook.
    codec_channels: int = 12
    codec_vocab_size: int = 1027
    codec_eos: int = 1024
    codec_pad: int = 1025
    codec_bos: int = 1026
    codec_delay_pattern: tuple[int, ...] = (0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
    # Special token ids in the text vocabulary.
    codec_placeholder_id: int = 151665
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(f"mrope_section={self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if len(self.codec_delay_pattern) != self.codec_channels:
            raise ConfigError(
                f"codec_delay_pattern has {len(self.codec_delay_pattern)} entries for "
                f"codec_channels={self.codec_channels}: give one delay per codebook"
            )
        if self.codec_delay_pattern[0] != 0 or any(d < 0 for d in self.codec_delay_pattern):
            raise ConfigError("codec_delay_pattern must start at 0 and be non-negative")
        specials = {self.codec_eos, self.codec_pad, self.codec_bos}
        if len(specials) != 3 or min(specials) < 0 or max(specials) >= self.codec_vocab_size:
            raise ConfigError(
                "codec eos/pad/bos must be three distinct ids inside codec_vocab_size "
                f"(got {self.codec_eos}/{self.codec_pad}/{self.codec_bos}, vocab "
                f"{self.codec_vocab_size})"
            )
        if not (0 <= self.codec_placeholder_id < self.vocab_size):
            raise ConfigError(
                f"codec_placeholder_id={self.codec_placeholder_id} is outside the text vocab "
                f"({self.vocab_size}); it must be the tokenizer's <|AUDIO_PLACEHOLDER|> id"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def codebook_size(self) -> int:
        """Real codes per codebook (the specials sit above them)."""
        return min(self.codec_eos, self.codec_pad, self.codec_bos)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with top-level fields changed; pass ``moe=dict(...)`` to change MoE fields."""
        if isinstance(changes.get("moe"), dict):
            changes["moe"] = dataclasses.replace(self.moe, **changes["moe"])
        return dataclasses.replace(self, **changes)
