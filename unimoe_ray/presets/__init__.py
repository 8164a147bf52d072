"""Named model sizes, one registry (`get_preset`):
- ``tiny``: tests (seconds on CPU).
- ``small``: demo and benchmarks on 2 CPU cores.
- ``preview``: the released UniMoE-Audio-preview checkpoint's config.json, shipped unchanged
  beside this file (``unimoe_audio_preview_config.json``, docs/DESIGN.md §1).
"""

from __future__ import annotations

from pathlib import Path

from unimoe_ray.config import ConfigError, ModelConfig, MoEConfig, VisionConfig
from unimoe_ray.config_hf import load_config

PREVIEW_CONFIG_PATH = Path(__file__).parent / "unimoe_audio_preview_config.json"


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
            num_routed=4,
            num_null=1,
            num_shared=2,
            routed_intermediate=32,
            shared_intermediate=16,
            dense_intermediate=128,
        ),
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            window_size=56,
            fullatt_block_indexes=(1,),
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
            num_routed=8,
            num_null=1,
            num_shared=2,
            routed_intermediate=1376,
            shared_intermediate=688,
            dense_intermediate=5504,
        ),
        vision=VisionConfig(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            out_hidden_size=512,
            window_size=56,
            fullatt_block_indexes=(1,),
        ),
        codec_placeholder_id=900,
        video_token_id=901,
        vision_start_token_id=902,
        vision_end_token_id=903,
        eos_token_id=904,
        torch_dtype="float32",
    )


def _preview() -> ModelConfig:
    return load_config(PREVIEW_CONFIG_PATH)


PRESETS = {"tiny": _tiny, "small": _small, "preview": _preview}


def get_preset(name: str) -> ModelConfig:
    """A named model size (``tiny``, ``small``, ``preview``) or a path to a config.json."""
    if name in PRESETS:
        return PRESETS[name]()
    if Path(name).exists():
        return load_config(name)
    raise ConfigError(f"unknown preset {name!r}: use one of {sorted(PRESETS)} or a config path")
