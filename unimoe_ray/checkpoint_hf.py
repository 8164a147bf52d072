"""The pretrained start (paper §4, stage 1): a dense specialist initialised from a local
Qwen2.5-VL folder in the Hugging Face layout (config.json + safetensors, as
`Qwen2_5_VLForConditionalGeneration.save_pretrained` writes it or the hub ships it).

Copied (every specialist from the same folder gets the same tensors):

    Qwen2.5-VL (on disk)                    our specialist (in memory)
    model.embed_tokens.weight      rows →   language_model.embed_tokens.weight
    model.layers.{i}.self_attn.*            language_model.layers.{i}.self_attn.*
    model.layers.{i}.*_layernorm.weight     language_model.layers.{i}.*_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
                                            language_model.layers.{i}.mlp.{…}  (the specialist FFN)
    model.norm.weight                       language_model.norm.weight
    visual.*                                visual.*  (the vision tower, same transformers class)
    lm_head.weight (or the embedding when tied) rows → lm_head.weight

The names go through `unimoe_ray.checkpoint`'s map (`model.` → `language_model.`); transformers'
in-memory spelling (`model.language_model.`, `model.visual.`) is read too. Text rows: the first
min(ours, theirs) rows are copied, the rest keep their initialisation: our tokenizer is
Qwen2.5's with the eleven audio specials appended from id 151665, where Qwen2.5-VL's
embedding holds only padding rows. New here, kept as initialised: the codec embeddings and the
codec head.

Rules: the model must be a dense specialist (stage 1) whose trunk has the pretrained model's
shape (hidden size, layers, heads, KV heads, RMSNorm eps, RoPE theta, M-RoPE sections), and
whose FFN width equals the pretrained MLP's: no cutting or padding. A mismatch is an error
naming both values. (The preview's 8 × 2752 routed experts over 4 specialists give 5504, half
of Qwen2.5-VL-3B's 11008; `--num-specialists 2` gives 11008.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from unimoe_ray.checkpoint import shard_files, to_memory_layout, to_memory_name
from unimoe_ray.config import ConfigError
from unimoe_ray.model.unimoe_audio import UniMoEAudio

# transformers' in-memory spelling → the hub's on-disk spelling, before the shared name map.
_HF_MEMORY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_ROW_COPIED = ("language_model.embed_tokens.weight", "lm_head.weight")
_NEW = ("codec_embed_tokens.", "codec_head.")


class PretrainedInitError(ConfigError):
    """A pretrained folder that does not fit the specialist; names the field, both values
    and the fix."""


@dataclass
class InitReport:
    """What `init_from_qwen2_5_vl` did."""

    source: str
    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # ours, left at their initialisation
    unused: list[str] = field(default_factory=list)  # theirs, with no place in our model
    rows_copied: int = 0

    def summary(self) -> str:
        return (
            f"initialised from {self.source}: {len(self.copied)} tensors copied ({self.rows_copied} text rows), "
            f"{len(self.kept)} kept as initialised (codec embeddings and head), {len(self.unused)} unused"
            + (f" (e.g. {self.unused[:3]})" if self.unused else "")
        )


def _hf_name(name: str) -> str:
    for old, new in _HF_MEMORY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def read_qwen2_5_vl(path: str | Path):
    """(transformers Qwen2_5_VLConfig, state dict under our in-memory names) of a local folder."""
    from transformers import Qwen2_5_VLConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--init-from {path}: no config.json; pass a local Qwen2.5-VL folder in the Hugging Face "
            "layout (config.json + model*.safetensors)"
        )
    cfg = Qwen2_5_VLConfig.from_pretrained(path)
    state = {}
    for f in shard_files(path):
        for name, t in load_file(f).items():
            state[to_memory_name(_hf_name(name))] = t
    return cfg, state


def check_trunk(ours, theirs) -> None:
    """Our specialist config against a Qwen2_5_VLConfig: every shape and constant of the trunk."""
    text = theirs.text_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
    pairs = [
        ("hidden_size", ours.hidden_size, text.hidden_size),
        ("num_layers (num_hidden_layers)", ours.num_layers, text.num_hidden_layers),
        ("num_heads (num_attention_heads)", ours.num_heads, text.num_attention_heads),
        ("num_kv_heads (num_key_value_heads)", ours.num_kv_heads, text.num_key_value_heads),
        ("rms_norm_eps", ours.rms_norm_eps, text.rms_norm_eps),
        ("rope_theta", ours.rope_theta, theta),
        ("mrope_section", tuple(ours.mrope_section), tuple(rope.get("mrope_section", ()))),
    ]
    if ours.vision is not None and getattr(theirs, "vision_config", None) is not None:
        # Fields that change the tower's computation without changing a tensor shape too.
        vis = theirs.vision_config
        for f in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "out_hidden_size",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "window_size",
            "hidden_act",
        ):
            pairs.append((f"vision.{f}", getattr(ours.vision, f), getattr(vis, f, None)))
        pairs.append(
            (
                "vision.fullatt_block_indexes",
                tuple(ours.vision.fullatt_block_indexes),
                tuple(getattr(vis, "fullatt_block_indexes", ())),
            )
        )
    for name, a, b in pairs:
        if a != b:
            raise PretrainedInitError(
                f"--init-from: our {name} is {a} but the pretrained model's is {b}: choose a --preset "
                "whose trunk matches the pretrained model (preview matches Qwen2.5-VL-3B)"
            )
    if ours.moe.mode != "dense":
        raise PretrainedInitError(
            f"--init-from initialises a dense stage-1 specialist; this config is a {ours.moe.mode!r} MoE"
        )
    if ours.moe.dense_intermediate != text.intermediate_size:
        raise PretrainedInitError(
            f"--init-from: the pretrained MLP is {text.intermediate_size} wide but the specialist FFN is "
            f"{ours.moe.dense_intermediate} wide ((routed experts ÷ specialists) × routed width): they must be "
            "equal (no cutting or padding); change --num-specialists or the preset's expert widths so that "
            "they match"
        )


@torch.no_grad()
def init_from_qwen2_5_vl(model: UniMoEAudio, path: str | Path) -> InitReport:
    """Copy a local Qwen2.5-VL folder's weights into a dense specialist, in place (cast to each
    parameter's dtype). Raises PretrainedInitError before anything is copied when the folder
    does not fit (module docstring)."""
    theirs, state = read_qwen2_5_vl(path)
    check_trunk(model.cfg, theirs)
    if "lm_head.weight" not in state or theirs.tie_word_embeddings:
        state["lm_head.weight"] = state["language_model.embed_tokens.weight"]
    own = model.state_dict()
    report = InitReport(source=str(path))
    needed = [k for k in own if not k.startswith(_NEW)]
    missing = [k for k in needed if k not in state]
    if missing:
        no_tower = any(k.startswith("visual.") for k in missing)
        raise PretrainedInitError(
            f"--init-from {path} lacks {len(missing)} tensors our specialist needs (e.g. {missing[:3]})"
            + ("; our config has a vision tower, theirs has none" if no_tower else "")
        )
    updates = {}
    for name in needed:
        src = state[name]
        if name in _ROW_COPIED:
            n = min(src.shape[0], own[name].shape[0])
            if src.shape[1:] != own[name].shape[1:]:
                raise PretrainedInitError(f"{name}: pretrained {tuple(src.shape)} vs ours {tuple(own[name].shape)}")
            dst = own[name].clone()
            dst[:n] = src[:n].to(dst.dtype)
            updates[name] = dst
            report.rows_copied = n
            continue
        src = to_memory_layout(name, src, own[name].shape)
        if src.shape != own[name].shape:
            raise PretrainedInitError(
                f"{name}: pretrained shape {tuple(src.shape)} != ours {tuple(own[name].shape)} (a vision tower "
                "of another size? the preset's vision config must match the pretrained one)"
            )
        updates[name] = src.to(own[name].dtype)
    model.load_state_dict(updates, strict=False)
    report.copied = sorted(updates)
    report.kept = sorted(k for k in own if k.startswith(_NEW))
    report.unused = sorted(set(state) - set(own))
    return report
