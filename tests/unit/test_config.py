import dataclasses
import json
from pathlib import Path

import pytest

from unimoe_ray.config import ConfigError, MoEConfig
from unimoe_ray.config_hf import from_hf_dict, load_config, save_config, to_hf_dict
from unimoe_ray.presets import PREVIEW_CONFIG_PATH, get_preset

# A copy of the released config.json shipped with the tests (tests never read outside the repo).
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "unimoe_audio_preview_config.json"


def test_preview_is_the_reference_file_unchanged():
    assert json.loads(REFERENCE.read_text()) == json.loads(PREVIEW_CONFIG_PATH.read_text())
    cfg = get_preset("preview")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (2048, 36, 16, 2)
    assert cfg.mrope_section == (16, 24, 24) and cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6
    m = cfg.moe
    assert (m.num_routed, m.num_null, m.num_shared, m.num_experts) == (8, 1, 2, 11)
    assert (m.routed_intermediate, m.shared_intermediate, m.top_p) == (2752, 1376, 0.7)
    assert m.weighting == "released" and m.fp32_gate and not m.token_drop
    assert cfg.codec_delay_pattern == (0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
    assert (cfg.codec_vocab_size, cfg.codec_eos, cfg.codec_pad, cfg.codec_bos) == (1027, 1024, 1025, 1026)
    assert cfg.codec_placeholder_id == 151665 and cfg.vocab_size == 151676 and cfg.hf_vocab_size == 151936
    assert cfg.vision.out_hidden_size == 2048 and cfg.vision.patch_size == 14


@pytest.mark.parametrize("name", ["tiny", "small", "preview"])
def test_hf_dict_round_trip(name, tmp_path):
    cfg = get_preset(name)
    assert from_hf_dict(to_hf_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path) == cfg


def test_config_json_without_optional_moe_keys_takes_the_dataclass_defaults():
    # A config.json that leaves out the optional MoE keys builds the model a preset builds
    # (jitter 0.01, aux weight 0.025 -> 0.001 over 10k steps), not a silently different one.
    d = to_hf_dict(get_preset("tiny"))
    optional = [
        "unimoe_moe_mode",
        "mlp_dynamic_top_k",
        "unimoe_weighting",
        "fp32_gate",
        "input_jitter_noise",
        "router_jitter_noise",
        "l_aux_weight",
        "min_l_aux_weight",
        "l_aux_weight_decay_steps",
        "token_drop",
        "capacity_factor",
        "min_capacity",
    ]
    for key in optional:
        del d["text_config"][key]
    moe = from_hf_dict(d).moe
    assert moe == get_preset("tiny").moe
    assert (moe.input_jitter, moe.router_jitter) == (0.01, 0.01)
    assert (moe.aux_weight_start, moe.aux_weight_end, moe.aux_weight_decay_steps) == (0.025, 0.001, 10_000)


def test_every_moe_field_is_written_to_config_json():
    # Change every field away from its default: the round trip must carry each one.
    moe = MoEConfig(
        mode="top_k",
        num_routed=3,
        num_null=0,
        num_shared=1,
        routed_intermediate=24,
        shared_intermediate=12,
        top_p=0.5,
        top_k=3,
        dense_intermediate=40,
        weighting="paper",
        fp32_gate=False,
        input_jitter=0.2,
        router_jitter=0.3,
        aux_weight_start=0.4,
        aux_weight_end=0.05,
        aux_weight_decay_steps=7,
        token_drop=True,
        capacity_factor=2.5,
        min_capacity=3,
    )
    # The SparseMixer router needs the released weighting: changed in a second config.
    sparsemixer = MoEConfig(ignore_differentiable_router=False)
    defaults = MoEConfig()
    fields = [f.name for f in dataclasses.fields(MoEConfig)]
    unchanged = [
        name
        for name in fields
        if getattr(moe, name) == getattr(defaults, name) and getattr(sparsemixer, name) == getattr(defaults, name)
    ]
    assert unchanged == [], f"the test must change every field; unchanged: {unchanged}"
    for m in (moe, sparsemixer):
        cfg = get_preset("tiny").replace(moe=m)
        assert from_hf_dict(to_hf_dict(cfg)).moe == m
    with pytest.raises(ConfigError, match="weighting='released'"):
        MoEConfig(ignore_differentiable_router=False, weighting="paper")


def test_aux_weight_schedule_decays_linearly():
    m = get_preset("preview").moe
    assert m.aux_weight(0) == pytest.approx(0.025)
    assert m.aux_weight(5000) == pytest.approx(0.013)
    assert m.aux_weight(10_000) == pytest.approx(0.001)
    assert m.aux_weight(50_000) == pytest.approx(0.001)


@pytest.mark.parametrize("p", [0.0, -0.5, 1.01])
def test_top_p_outside_unit_interval_is_rejected(p):
    cfg = get_preset("tiny")
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        cfg.replace(moe={"top_p": p})
    bad = to_hf_dict(cfg)
    bad["text_config"]["mlp_dynamic_top_p"] = p
    with pytest.raises(ConfigError, match="top_p"):
        from_hf_dict(bad)


def test_other_bad_configs_name_the_field(tmp_path):
    cfg = get_preset("tiny")
    with pytest.raises(ConfigError, match="codec_delay_pattern"):
        dataclasses.replace(cfg, codec_delay_pattern=(0, 1))
    with pytest.raises(ConfigError, match="mrope_section"):
        dataclasses.replace(cfg, mrope_section=(2, 2, 2))
    d = to_hf_dict(cfg)
    del d["codec_channels"]
    with pytest.raises(ConfigError, match="codec_channels"):
        from_hf_dict(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")
