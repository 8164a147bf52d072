"""Training checkpoints: a folder that `unimoe_ray.checkpoint.load_pretrained` opens as a model
(config.json + safetensors, released tensor names), plus what resuming needs:

    train_state.pt       optimizer + scheduler state, every worker's torch RNG state
                         (torch.save of tensors and plain values; loaded with weights_only)
    unimoe_train.json    stage, tasks, global step, data position, world size, seed
    deepspeed/           DeepSpeed's own optimizer shards when training with ZeRO
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.config import ModelConfig
from unimoe_ray.config_hf import load_config
from unimoe_ray.model.unimoe_audio import UniMoEAudio

TRAIN_STATE = "train_state.pt"
META = "unimoe_train.json"


def save_model_and_meta(module: UniMoEAudio, path: Path, meta: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained(module, path)
    (path / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def save_train_state(path: Path, state: dict) -> None:
    torch.save(state, path / TRAIN_STATE)


def load_train_state(path: str | Path) -> dict:
    f = Path(path) / TRAIN_STATE
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: {path} is not a training checkpoint of unimoe_ray.train")
    return torch.load(f, map_location="cpu", weights_only=True)


def read_meta(path: str | Path) -> dict:
    """The training record of a checkpoint folder ({} for a plain model folder)."""
    f = Path(path) / META
    return json.loads(f.read_text()) if f.is_file() else {}


def check_model_folder(path: str | Path, what: str) -> ModelConfig:
    """A clear error before any worker starts when a checkpoint folder is missing or broken."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: checkpoint folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: {path} has no config.json; pass a folder written by save_pretrained or by a "
            "training stage (--out)"
        )
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{what}: {path} holds no *.safetensors weights")
    return load_config(path)
