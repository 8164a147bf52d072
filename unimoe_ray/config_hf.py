"""The released checkpoint's `config.json` (a Hugging Face dict: top level + `text_config` +
`vision_config`) <-> the config dataclasses, both directions; the only place config dicts are
read (docs/DESIGN.md §1). `load_config` takes a checkpoint folder or a config.json path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from unimoe_ray.config import ConfigError, ModelConfig, MoEConfig, VisionConfig

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
        name: text[key] if required else text.get(key, _MOE_DEFAULTS[name]) for key, name, required in _MOE_HF_KEYS
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


def from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
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
        return ModelConfig(
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


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The released layout, so our checkpoints open where the released ones do."""
    rope = {"mrope_section": list(config.mrope_section), "rope_type": "default", "type": "default"}
    text = {
        "model_type": "qwen2_5_vl_moe_text",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "hidden_act": "silu",
        **_moe_to_hf(config.moe),
    }
    out: dict[str, Any] = {
        "architectures": ["UniAudioRVQQwen2_5VLMoEForConditionalGeneration"],
        "model_type": "uni_audio_rvq_qwen2_5vl_moe",
        "text_config": text,
        "vocab_size": config.hf_vocab_size or config.vocab_size,
        "codec_channels": config.codec_channels,
        "codec_vocab_size": config.codec_vocab_size,
        "codec_eos_value": config.codec_eos,
        "codec_pad_value": config.codec_pad,
        "codec_bos_value": config.codec_bos,
        "codec_delay_pattern": list(config.codec_delay_pattern),
        "codec_placeholder_value": config.codec_placeholder_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": config.torch_dtype,
    }
    if config.vision is not None:
        v = dataclasses.asdict(config.vision)
        v["fullatt_block_indexes"] = list(config.vision.fullatt_block_indexes)
        v["model_type"] = "qwen2_5_vl"
        out["vision_config"] = v
    return out


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (its config.json) or of a config.json file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no model config at {path}: pass a checkpoint folder containing config.json "
            "or a preset name (tiny, small, preview)"
        )
    return from_hf_dict(json.loads(path.read_text()))


def save_config(config: ModelConfig, path: str | Path) -> None:
    """Write `config` as a released-style config.json at `path`."""
    Path(path).write_text(json.dumps(to_hf_dict(config), indent=2) + "\n")
