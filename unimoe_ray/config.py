"""Model configuration: small frozen dataclasses, a preset registry, and the one place where the
released checkpoint's `config.json` (a Hugging Face dict) is turned into them and back.

Presets:
- ``tiny``: tests (seconds on CPU).
- ``small``: demo and benchmarks on 2 CPU cores.
- ``preview``: the released UniMoE-Audio-preview checkpoint's config.json, shipped unchanged in
  the package (``presets/unimoe_audio_preview_config.json``, docs/DESIGN.md §1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Weighting = Literal["paper", "released"]
MoEMode = Literal["top_p", "top_k", "dense"]

PREVIEW_CONFIG_PATH = Path(__file__).parent / "presets" / "unimoe_audio_preview_config.json"


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
            raise ConfigError(
                f"moe.top_p={self.top_p}: Top-P threshold must be in (0, 1] (the paper uses 0.7)"
            )
        if self.weighting not in ("paper", "released"):
            raise ConfigError(f"moe.weighting={self.weighting!r}: use 'paper' or 'released'")
        if self.num_routed < 1 or self.num_null < 0 or self.num_shared < 0:
            raise ConfigError(
                f"moe experts: num_routed={self.num_routed} (>=1), num_null={self.num_null} "
                f"(>=0), num_shared={self.num_shared} (>=0)"
            )
        if self.mode == "top_k" and not (1 <= self.top_k <= self.num_dynamic):
            raise ConfigError(
                f"moe.top_k={self.top_k}: must be in [1, num_routed + num_null = {self.num_dynamic}]"
            )
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


# config.json `text_config` key <-> MoEConfig field, the one table both directions read. A key
# that a config.json lacks takes the dataclass default, so a preset and a config.json without
# the key build the same model. Required keys have no default that could fit a checkpoint (they
# set tensor shapes). `mode` and `top_k` share the released key `mlp_dynamic_top_k` (0: Top-P;
# k: Top-K with k experts) and are handled beside the table.
_MOE_HF_KEYS: tuple[tuple[str, str, bool], ...] = (
    # (hf key, MoEConfig field, required)
    ("mlp_dynamic_expert_num", "num_routed", True),
    ("mlp_dynamic_null_expert_num", "num_null", True),
    ("mlp_fixed_expert_num", "num_shared", True),
    ("dynamic_intermediate_size", "routed_intermediate", True),
    ("shared_intermediate_size", "shared_intermediate", True),
    ("intermediate_size", "dense_intermediate", True),
    ("mlp_dynamic_top_p", "top_p", True),
    ("unimoe_weighting", "weighting", False),
    ("fp32_gate", "fp32_gate", False),
    ("input_jitter_noise", "input_jitter", False),
    ("router_jitter_noise", "router_jitter", False),
    ("l_aux_weight", "aux_weight_start", False),
    ("min_l_aux_weight", "aux_weight_end", False),
    ("l_aux_weight_decay_steps", "aux_weight_decay_steps", False),
    ("token_drop", "token_drop", False),
    ("ignore_differentiable_router", "ignore_differentiable_router", False),
    ("capacity_factor", "capacity_factor", False),
    ("min_capacity", "min_capacity", False),
)
_MOE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoEConfig)}


def _moe_from_hf(text: dict[str, Any]) -> MoEConfig:
    """MoEConfig from a `text_config` dict; KeyError names a missing required key."""
    kwargs = {
        name: text[key] if required else text.get(key, _MOE_DEFAULTS[name])
        for key, name, required in _MOE_HF_KEYS
    }
    released_k = text.get("mlp_dynamic_top_k")
    kwargs["mode"] = text.get("unimoe_moe_mode", "top_k" if released_k else "top_p")
    kwargs["top_k"] = int(released_k) if released_k else _MOE_DEFAULTS["top_k"]
    return MoEConfig(**kwargs)


def _moe_to_hf(moe: MoEConfig) -> dict[str, Any]:
    out = {key: getattr(moe, name) for key, name, _ in _MOE_HF_KEYS}
    out["mlp_dynamic_top_k"] = float(moe.top_k) if moe.mode == "top_k" else 0.0
    out["unimoe_moe_mode"] = moe.mode
    return out


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
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(
                f"mrope_section={self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )
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

    # ---- Hugging Face config.json <-> dataclasses (the only place dicts are read) ----

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Read a released-style ``config.json`` dict (top level + ``text_config``)."""
        text = cfg.get("text_config", cfg)
        try:
            moe = _moe_from_hf(text)
            vis = cfg.get("vision_config")
            vision = None
            if vis is not None:
                vision = VisionConfig(
                    depth=vis["depth"],
                    hidden_size=vis["hidden_size"],
                    intermediate_size=vis["intermediate_size"],
                    num_heads=vis["num_heads"],
                    out_hidden_size=vis["out_hidden_size"],
                    patch_size=vis["patch_size"],
                    temporal_patch_size=vis["temporal_patch_size"],
                    spatial_merge_size=vis["spatial_merge_size"],
                    in_channels=vis.get("in_channels", 3),
                    window_size=vis.get("window_size", 112),
                    fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", ())),
                    tokens_per_second=vis.get("tokens_per_second", 2),
                    hidden_act=vis.get("hidden_act", "silu"),
                )
            rope = text.get("rope_scaling") or {}
            return cls(
                hidden_size=text["hidden_size"],
                num_layers=text["num_hidden_layers"],
                num_heads=text["num_attention_heads"],
                num_kv_heads=text["num_key_value_heads"],
                rms_norm_eps=text["rms_norm_eps"],
                rope_theta=text["rope_theta"],
                mrope_section=tuple(rope.get("mrope_section", ())),
                # The embedding / lm_head rows are text_config.vocab_size (151676 in the
                # released checkpoint); the top-level vocab_size (151936) sizes no tensor.
                vocab_size=text["vocab_size"],
                hf_vocab_size=(
                    cfg["vocab_size"] if cfg.get("vocab_size", text["vocab_size"]) != text["vocab_size"] else None
                ),
                max_position_embeddings=text.get("max_position_embeddings", 128_000),
                initializer_range=text.get("initializer_range", 0.02),
                moe=moe,
                vision=vision,
                codec_channels=cfg["codec_channels"],
                codec_vocab_size=cfg["codec_vocab_size"],
                codec_eos=cfg["codec_eos_value"],
                codec_pad=cfg["codec_pad_value"],
                codec_bos=cfg["codec_bos_value"],
                codec_delay_pattern=tuple(cfg["codec_delay_pattern"]),
                codec_placeholder_id=cfg["codec_placeholder_value"],
                video_token_id=cfg.get("video_token_id", 151656),
                vision_start_token_id=cfg.get("vision_start_token_id", 151652),
                vision_end_token_id=cfg.get("vision_end_token_id", 151653),
                eos_token_id=cfg.get("eos_token_id", text.get("eos_token_id", 151645)),
                torch_dtype=cfg.get("torch_dtype", "bfloat16"),
            )
        except KeyError as err:
            raise ConfigError(
                f"config.json lacks the field {err.args[0]!r}; it must be a UniMoE-Audio config "
                "(see unimoe_ray/presets/unimoe_audio_preview_config.json)"
            ) from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The released layout, so our checkpoints open where the released ones do."""
        rope = {"mrope_section": list(self.mrope_section), "rope_type": "default", "type": "default"}
        text = {
            "model_type": "qwen2_5_vl_moe_text",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            **_moe_to_hf(self.moe),
        }
        out: dict[str, Any] = {
            "architectures": ["UniAudioRVQQwen2_5VLMoEForConditionalGeneration"],
            "model_type": "uni_audio_rvq_qwen2_5vl_moe",
            "text_config": text,
            "vocab_size": self.hf_vocab_size or self.vocab_size,
            "codec_channels": self.codec_channels,
            "codec_vocab_size": self.codec_vocab_size,
            "codec_eos_value": self.codec_eos,
            "codec_pad_value": self.codec_pad,
            "codec_bos_value": self.codec_bos,
            "codec_delay_pattern": list(self.codec_delay_pattern),
            "codec_placeholder_value": self.codec_placeholder_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.vision is not None:
            v = dataclasses.asdict(self.vision)
            v["fullatt_block_indexes"] = list(self.vision.fullatt_block_indexes)
            v["model_type"] = "qwen2_5_vl"
            out["vision_config"] = v
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no model config at {path}: pass a checkpoint folder containing config.json "
                "or a preset name (tiny, small, preview)"
            )
        return cls.from_hf_dict(json.loads(path.read_text()))

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


def _tiny() -> ModelConfig:
    return ModelConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(2, 1, 1),
        vocab_size=640,
        max_position_embeddings=4096,
        moe=MoEConfig(
            num_routed=4, num_null=1, num_shared=2, routed_intermediate=32,
            shared_intermediate=16, dense_intermediate=128,
        ),
        vision=VisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
            window_size=56, fullatt_block_indexes=(1,),
        ),
        codec_placeholder_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
        eos_token_id=504,
        torch_dtype="float32",
    )


def _small() -> ModelConfig:
    return ModelConfig(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        mrope_section=(8, 12, 12),
        vocab_size=1024,
        max_position_embeddings=8192,
        moe=MoEConfig(
            num_routed=8, num_null=1, num_shared=2, routed_intermediate=1376,
            shared_intermediate=688, dense_intermediate=5504,
        ),
        vision=VisionConfig(
            depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=512,
            window_size=56, fullatt_block_indexes=(1,),
        ),
        codec_placeholder_id=900,
        video_token_id=901,
        vision_start_token_id=902,
        vision_end_token_id=903,
        eos_token_id=904,
        torch_dtype="float32",
    )


def _preview() -> ModelConfig:
    return ModelConfig.from_json(PREVIEW_CONFIG_PATH)


PRESETS = {"tiny": _tiny, "small": _small, "preview": _preview}


def get_preset(name: str) -> ModelConfig:
    """A named model size (``tiny``, ``small``, ``preview``) or a path to a config.json."""
    if name in PRESETS:
        return PRESETS[name]()
    if Path(name).exists():
        return ModelConfig.from_json(name)
    raise ConfigError(f"unknown preset {name!r}: use one of {sorted(PRESETS)} or a config path")
