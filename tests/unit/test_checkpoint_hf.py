"""The pretrained start (unimoe_ray.checkpoint_hf): a small random Qwen2.5-VL saved by
transformers, loaded through our path, gives our trunk transformers' hidden states."""

from __future__ import annotations

import json

import pytest
import torch

from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.checkpoint_hf import PretrainedInitError, init_from_qwen2_5_vl
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.train.integrate import specialist_config


def _qwen(path, *, intermediate=32, vocab=700, tied=False, theta=1e6, window=56):
    """A random Qwen2_5_VLForConditionalGeneration with the tiny preset's trunk and tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            rope_theta=theta,
            rms_norm_eps=1e-6,
            bos_token_id=0,
            eos_token_id=1,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            max_position_embeddings=4096,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            window_size=window,
            fullatt_block_indexes=[1],
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
        ),
        tie_word_embeddings=tied,
    )
    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    return model


def _specialist() -> UniMoEAudio:
    cfg = specialist_config(get_preset("tiny"), 4)  # dense FFN of (4 routed ÷ 4) × 32 = 32
    return UniMoEAudio(cfg).init_weights(seed=0).eval()


def test_trunk_and_vision_tower_equal_transformers(tmp_path):
    theirs = _qwen(tmp_path / "qwen")
    ours = _specialist()
    codec_before = ours.codec_head.weight.clone()
    report = init_from_qwen2_5_vl(ours, tmp_path / "qwen")
    assert report.rows_copied == 640 and report.unused == []  # our 640 text rows out of their 700
    assert all(k.startswith(("codec_embed_tokens.", "codec_head.")) for k in report.kept)
    assert torch.equal(ours.codec_head.weight, codec_before)  # new here: kept as initialised

    ids_BL = torch.randint(0, 640, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_BLD = theirs.model(input_ids=ids_BL).last_hidden_state
        got_BLD = ours(ids_BL, return_logits=False).hidden_BLD
        fresh_BLD = _specialist()(ids_BL, return_logits=False).hidden_BLD
    torch.testing.assert_close(got_BLD, ref_BLD, atol=1e-5, rtol=0)
    assert (fresh_BLD - ref_BLD).abs().max() > 0.1  # the comparison can fail
    torch.testing.assert_close(ours.lm_head.weight, theirs.lm_head.weight[:640], atol=0, rtol=0)

    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    grid = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours.visual(pixels, grid_thw=grid).pooler_output,
            theirs.model.visual(pixels, grid_thw=grid).pooler_output,
            atol=1e-5,
            rtol=0,
        )


def test_hub_layout_with_tied_embeddings(tmp_path):
    """The hub's Qwen2.5-VL-3B folder: a flat config.json (text keys at the top level, the
    legacy rope_scaling) and tied embeddings (no lm_head tensor)."""
    theirs = _qwen(tmp_path / "qwen", tied=True)
    flat = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 700,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
        "torch_dtype": "float32",
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "model_type": "qwen2_5_vl",
        },
    }
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(flat))
    ours = _specialist()
    init_from_qwen2_5_vl(ours, tmp_path / "qwen")
    embed = theirs.model.language_model.embed_tokens.weight
    torch.testing.assert_close(ours.lm_head.weight, embed[:640], atol=0, rtol=0)


def test_mismatches_are_errors_naming_both_values(tmp_path):
    _qwen(tmp_path / "wide", intermediate=64)
    with pytest.raises(PretrainedInitError, match=r"MLP is 64 wide but the specialist FFN is 32 wide"):
        init_from_qwen2_5_vl(_specialist(), tmp_path / "wide")
    _qwen(tmp_path / "theta", theta=1e4)
    with pytest.raises(PretrainedInitError, match=r"rope_theta is 1000000.0 but the pretrained model's is 10000.0"):
        init_from_qwen2_5_vl(_specialist(), tmp_path / "theta")
    _qwen(tmp_path / "window", window=112)  # same tensors, another attention window in the tower
    with pytest.raises(PretrainedInitError, match=r"vision.window_size is 56 but the pretrained model's is 112"):
        init_from_qwen2_5_vl(_specialist(), tmp_path / "window")
    moe = UniMoEAudio(get_preset("tiny"))
    with pytest.raises(PretrainedInitError, match="dense stage-1 specialist"):
        init_from_qwen2_5_vl(moe, tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        init_from_qwen2_5_vl(_specialist(), tmp_path / "nowhere")


def test_stage1_starts_every_specialist_from_the_folder(tmp_path, monkeypatch):
    """stage1(init_from=...) writes its initial checkpoint from the pretrained folder, the same
    for every task (training itself is stubbed out: only the start is checked here)."""
    from unimoe_ray.text.tokenizer import build_test_tokenizer
    from unimoe_ray.train import stages
    from unimoe_ray.train.config import stage_config

    theirs = _qwen(tmp_path / "qwen")
    specs = []
    monkeypatch.setattr(stages, "run_training", lambda spec: specs.append(spec))
    monkeypatch.setattr(stages, "_finish", lambda result, out: out)
    common = stages.Common(
        shards=[], tokenizer=str(build_test_tokenizer(tmp_path / "tok")), storage_path=str(tmp_path / "runs")
    )
    for task in ("tts_en", "t2m"):
        stages.stage1(
            common,
            task=task,
            preset="tiny",
            train=stage_config("stage1"),
            out=str(tmp_path / task),
            name=f"s1_{task}",
            init_from=str(tmp_path / "qwen"),
        )
    a, b = (load_pretrained(s.init, dtype=torch.float32) for s in specs)
    assert specs[0].meta["init_from"] == str((tmp_path / "qwen").resolve())
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    q = theirs.model.language_model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(a.language_model.layers[1].mlp.down_proj.weight, q, atol=0, rtol=0)
