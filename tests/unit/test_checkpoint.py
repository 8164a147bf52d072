import json

import pytest
import torch

from unimoe_ray import checkpoint as ckpt
from unimoe_ray.model.unimoe_audio import UniMoEAudio


def test_name_map_matches_the_released_checkpoint():
    pairs = {
        "language_model.layers.3.mlp.gate.weight": "model.layers.3.mlp.gate.weight",
        "language_model.layers.3.mlp.routed_experts.5.up_proj.weight":
            "model.layers.3.mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.5.up_proj.weight",
        "language_model.layers.0.mlp.shared_experts.1.down_proj.weight":
            "model.layers.0.mlp.fixed_real_moe.1.down_proj.weight",
        "language_model.embed_tokens.weight": "model.embed_tokens.weight",
        "language_model.layers.2.self_attn.q_proj.bias": "model.layers.2.self_attn.q_proj.bias",
        "codec_embed_tokens.11.weight": "codec_embed_tokens.11.weight",
        "codec_head.weight": "codec_head.weight",
        "lm_head.weight": "lm_head.weight",
        "visual.blocks.0.attn.qkv.weight": "visual.blocks.0.attn.qkv.weight",
    }
    for mem, disk in pairs.items():
        assert ckpt.to_disk_name(mem) == disk
        assert ckpt.to_memory_name(disk) == mem
        assert ckpt.to_memory_name(mem) == mem  # the in-memory spelling is accepted too


@pytest.mark.parametrize("shard_bytes", [2 * 1024**3, 300_000])
def test_save_load_gives_identical_logits(tiny_model, tmp_path, shard_bytes):
    ckpt.save_pretrained(tiny_model, tmp_path, max_shard_bytes=shard_bytes)
    if shard_bytes < 1e6:
        index = json.loads((tmp_path / ckpt.INDEX_FILE).read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert "model.layers.0.mlp.fixed_real_moe.0.gate_proj.weight" in index["weight_map"]
    loaded = ckpt.load_pretrained(tmp_path)
    ids = torch.randint(0, 400, (2, 9))
    torch.testing.assert_close(loaded(ids).codec_logits_BLKV, tiny_model(ids).codec_logits_BLKV, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))


def test_missing_or_mismatched_weights_are_clear_errors(tiny_model, tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model config"):
        ckpt.load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_weights(tiny_model, tmp_path / "nope")
    tiny_cfg.save_json(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ckpt.load_pretrained(tmp_path)
    ckpt.save_pretrained(tiny_model, tmp_path / "a", max_shard_bytes=300_000)
    next((tmp_path / "a").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ckpt.load_pretrained(tmp_path / "a")
    bigger = UniMoEAudio(tiny_cfg.replace(num_layers=3))
    ckpt.save_pretrained(tiny_model, tmp_path / "b")
    with pytest.raises(ValueError, match="missing"):
        ckpt.load_weights(bigger, tmp_path / "b")
