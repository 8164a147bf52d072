import json
from pathlib import Path

import pytest
import torch

from unimoe_ray import checkpoint as ckpt
from unimoe_ray.config_hf import save_config, to_hf_dict
from unimoe_ray.model.params import count_parameters
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset


def test_name_map_matches_the_released_checkpoint():
    pairs = {
        "language_model.layers.3.mlp.gate.weight": "model.layers.3.mlp.gate.weight",
        "language_model.layers.3.mlp.routed_experts.5.up_proj.weight": "model.layers.3.mlp.dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.5.up_proj.weight",
        "language_model.layers.0.mlp.shared_experts.1.down_proj.weight": "model.layers.0.mlp.fixed_real_moe.1.down_proj.weight",
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
    save_config(tiny_cfg, tmp_path / "config.json")
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


RELEASED_SHAPES = Path(__file__).resolve().parents[1] / "data" / "released_tensor_shapes.json"


def test_preview_layout_is_the_released_checkpoint_tensor_for_tensor():
    """Every tensor the released checkpoint stores, by name and shape, and nothing else
    (tests/data/released_tensor_shapes.json was read off the released model class)."""
    ref = json.loads(RELEASED_SHAPES.read_text())
    with torch.device("meta"):
        model = UniMoEAudio(get_preset("preview"))
    ours = {ckpt.to_disk_name(k): list(ckpt._to_disk_layout(k, v).shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref["shapes"]) - set(ours)) == []
    assert sorted(set(ours) - set(ref["shapes"])) == []
    assert {k: v for k, v in ours.items() if ref["shapes"][k] != v} == {}
    assert len(ours) == ref["tensors"] == 1846
    assert count_parameters(get_preset("preview")).total == ref["parameters"] == 7_159_504_896


def test_released_layout_round_trip_is_exact(tiny_model, tmp_path):
    """On disk: the released 4-D patch embedding and text_config-sized embeddings; loading it
    back restores the 5-D Conv3d weight bit for bit."""
    from safetensors.torch import load_file

    ckpt.save_pretrained(tiny_model, tmp_path)
    disk = load_file(tmp_path / ckpt.SINGLE_FILE)
    w5 = tiny_model.visual.patch_embed.proj.weight
    w4 = disk[ckpt.PATCH_EMBED]
    assert w5.dim() == 5 and w4.shape == (w5.shape[0], w5.shape[1] * w5.shape[2], *w5.shape[3:])
    # channel-major (channel, time) pairs: disk channel c·t_size + t is (c, t)
    assert torch.equal(w4[:, 1 * w5.shape[2] + 1], w5[:, 1, 1])
    assert disk["model.embed_tokens.weight"].shape[0] == tiny_model.cfg.vocab_size
    loaded = ckpt.load_pretrained(tmp_path)
    for name, t in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ckpt.save_pretrained(loaded, tmp_path / "again")
    again = load_file(tmp_path / "again" / ckpt.SINGLE_FILE)
    assert again.keys() == disk.keys() and all(torch.equal(again[k], disk[k]) for k in disk)


def test_released_config_reads_the_text_vocab_and_writes_back_unchanged(tmp_path):
    cfg = get_preset("preview")
    assert cfg.vocab_size == 151676 and cfg.hf_vocab_size == 151936
    d = to_hf_dict(cfg)
    assert d["vocab_size"] == 151936 and d["text_config"]["vocab_size"] == 151676


def test_load_honours_the_checkpoint_dtype_and_routes_in_it(tiny_model, tmp_path):
    ckpt.save_pretrained(tiny_model.to(torch.bfloat16), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = ckpt.load_pretrained(tmp_path)
    assert m.codec_head.weight.dtype == torch.bfloat16
    assert all(not layer.fp32_router_at_inference for layer in m.moe_layers)
    m32 = ckpt.load_pretrained(tmp_path, dtype="float32", router_precision="fp32")
    assert m32.codec_head.weight.dtype == torch.float32
    assert all(layer.fp32_router_at_inference for layer in m32.moe_layers)
    with pytest.raises(ValueError, match="unknown dtype"):
        ckpt.load_pretrained(tmp_path, dtype="int3")
