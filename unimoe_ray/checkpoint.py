"""Checkpoints: safetensors folders (config.json + shards + index, never pickle) whose tensor
names are the released UniMoE-Audio-preview checkpoint's, so its weights load as they are.

Name map (in memory → on disk); everything else is identical:

    language_model.                    → model.
    .mlp.routed_experts.{k}.           → .mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{k}.
    .mlp.shared_experts.{j}.           → .mlp.fixed_real_moe.{j}.

e.g. ``language_model.layers.3.mlp.routed_experts.5.up_proj.weight`` is stored as
``model.layers.3.mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.5.up_proj.weight``.
Loading accepts either spelling (``model.`` or ``language_model.`` prefix).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unimoe_ray.config_hf import load_config, save_config
from unimoe_ray.model.moe import set_router_precision
from unimoe_ray.model.unimoe_audio import UniMoEAudio

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_TO_DISK = [
    (re.compile(r"^language_model\."), "model."),
    (
        re.compile(r"\.mlp\.routed_experts\.(\d+)\."),
        r".mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.\1.",
    ),
    (re.compile(r"\.mlp\.shared_experts\.(\d+)\."), r".mlp.fixed_real_moe.\1."),
]
_TO_MEMORY = [
    (re.compile(r"^model\."), "language_model."),
    (
        re.compile(r"\.mlp\.dynamic_real_moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."),
        r".mlp.routed_experts.\1.",
    ),
    (re.compile(r"\.mlp\.fixed_real_moe\.(\d+)\."), r".mlp.shared_experts.\1."),
]


# Tensors whose on-disk layout differs from the module's (beyond the name): the released
# checkpoint stores the vision patch embedding, a Conv3d (out, C, t, p, p) in transformers'
# tower, as a Conv2d-style (out, C·t, p, p) over channel-major (channel, time) pairs. Both
# directions are reshapes of the same memory order, so a round trip is exact.
PATCH_EMBED = "visual.patch_embed.proj.weight"


def _to_disk_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    if name == PATCH_EMBED and t.dim() == 5:
        return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])
    return t


def to_memory_layout(name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A stored tensor in the layout the in-memory module expects (`shape`): the released
    Conv2d-style patch embedding (out, C·t, p, p) becomes the tower's Conv3d (out, C, t, p, p);
    any other tensor is returned as it is. Shared with the expert-parallel weight split."""
    if name == PATCH_EMBED and t.dim() == 4 and len(shape) == 5 and t.numel() == shape.numel():
        return t.reshape(shape)
    return t


def _apply(rules, name: str) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name)
    return name


def to_disk_name(name: str) -> str:
    return _apply(_TO_DISK, name)


def to_memory_name(name: str) -> str:
    return _apply(_TO_MEMORY, name)


def to_disk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors under their on-disk names and layouts, contiguous on the CPU: what
    save_pretrained writes (the expert-parallel trainer writes a model's parts with it)."""
    return {to_disk_name(n): _to_disk_layout(n, t.detach()).contiguous().cpu() for n, t in state.items()}


def save_pretrained(model: UniMoEAudio, path: str | Path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write config.json and safetensors shards (+ index when more than one shard)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_config(model.cfg, path / "config.json")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][to_disk_name(name)] = _to_disk_layout(name, tensor.detach()).contiguous().cpu()
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata={"format": "pt"})
        return path
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    (path / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return path


def shard_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, or a clear error naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {path} does not exist: pass a folder holding config.json and "
            f"{SINGLE_FILE} (or {INDEX_FILE} with its shards)"
        )
    if (path / INDEX_FILE).is_file():
        names = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: the index names shards that are missing: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(
        f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} (.pt/.bin pickles are "
        "not read; convert them to safetensors)"
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, under in-memory names."""
    state: dict[str, torch.Tensor] = {}
    for f in shard_files(path):
        for name, t in load_file(f).items():
            state[to_memory_name(name)] = t
    return state


def load_weights(model: UniMoEAudio, path: str | Path, *, strict: bool = True) -> UniMoEAudio:
    """Copy a checkpoint's tensors into `model` (cast to each parameter's dtype)."""
    state = load_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {path} does not match the model config: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    state = {k: to_memory_layout(k, v, own[k].shape) if k in own else v for k, v in state.items()}
    for name, t in state.items():
        if name in own and own[name].shape != t.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(own[name].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=strict)
    return model


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    router_precision: str | None = None,
) -> UniMoEAudio:
    """Build the model from the folder's config.json and load its weights, as stored (for
    training, evaluation, or as the first step of `AudioGenerator.load`, which then prepares the
    model for inference: `unimoe_ray.model.quantize.convert_experts`).

    dtype: default the checkpoint's `torch_dtype` (bf16 for the released model), as the
    released loader does; pass torch.float32 to compute in fp32 (e.g. training on CPU).
    router_precision: "model" routes in the model's dtype at inference, as the released code
    does (it computes the router in fp32 only in training); "fp32" always in fp32. Default:
    "model" for a bf16/fp16 model, "fp32" otherwise (the same thing in fp32).
    """
    cfg = load_config(path)
    dtype = resolve_dtype(cfg.torch_dtype if dtype is None else dtype)
    model = UniMoEAudio(cfg).to(dtype)
    load_weights(model, path)
    if router_precision is None:
        router_precision = "model" if dtype in (torch.bfloat16, torch.float16) else "fp32"
    set_router_precision(model, router_precision)
    return model.to(device).eval()


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or its name ("bfloat16", "bf16", "float32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}") from None
