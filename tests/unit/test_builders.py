"""builders: a random-weight model for a preset and a tokenizer, and the artifacts a fresh
clone runs on, through the same save/load code real weights use."""

from __future__ import annotations

import torch

from unimoe_ray.builders import ArtifactsConfig, new_model, prepare_artifacts
from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.presets import get_preset
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer, special_token_ids


def test_new_model_follows_the_tokenizer_and_the_seed(tmp_path):
    tok = load_tokenizer(build_test_tokenizer(tmp_path / "tok"))
    a, b, c = new_model("tiny", tok, seed=3), new_model(get_preset("tiny"), tok, seed=3), new_model("tiny", tok, seed=4)
    assert a.cfg.codec_placeholder_id == special_token_ids(tok)["<|AUDIO_PLACEHOLDER|>"]
    assert a.cfg.vocab_size >= len(tok) and a.cfg == b.cfg
    wa, wb, wc = (m.codec_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_the_same_seed_gives_every_tensor_the_same_whatever_the_global_generator(tmp_path):
    """The vision tower too (transformers initialises it from torch's global generator): the
    four stage-1 specialists, built one after another in one process, start identical."""
    tok = load_tokenizer(build_test_tokenizer(tmp_path / "tok"))
    torch.manual_seed(0)
    a = new_model("tiny", tok, seed=3).state_dict()
    torch.rand(1000)  # another position of the global stream
    after = torch.get_rng_state()
    b = new_model("tiny", tok, seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), after)  # the caller's stream is left where it was
    assert any(k.startswith("visual.") for k in a) and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    c = new_model("tiny", tok, seed=4).state_dict()
    assert not torch.equal(a["visual.blocks.0.attn.qkv.weight"], c["visual.blocks.0.attn.qkv.weight"])


def test_prepare_artifacts_writes_what_load_reads_and_keeps_given_paths(tmp_path):
    ckpt, tok, dac = prepare_artifacts(ArtifactsConfig(out_dir=str(tmp_path / "a"), preset="tiny", seed=1))
    assert ckpt == tmp_path / "a" / "checkpoint_tiny" and dac.is_file() and (tok / "tokenizer.json").is_file()
    model = load_pretrained(ckpt)
    expected = new_model("tiny", load_tokenizer(tok), seed=1)
    assert model.cfg == expected.cfg
    assert torch.equal(model.codec_head.weight, expected.codec_head.weight)
    # Paths given are used as they are; only the missing ones are made.
    again = prepare_artifacts(
        ArtifactsConfig(out_dir=str(tmp_path / "b"), checkpoint=str(ckpt), tokenizer=str(tok), dac_path=str(dac))
    )
    assert again == (ckpt, tok, dac) and not (tmp_path / "b").exists()


def test_an_in_memory_generator_matches_the_loaded_one(tmp_path, monkeypatch):
    """`AudioGenerator(model, tokenizer, codec)` takes objects (no trip through disk);
    `AudioGenerator.load` reads the same artifacts from their paths: same codes, same audio."""
    monkeypatch.setenv("UNIMOE_KERNELS", "default")  # no kernel measurement in a unit test
    from unimoe_ray.audio.codec import DACCodec
    from unimoe_ray.inference.pipeline import AudioGenerator
    from unimoe_ray.inference.sampling import task_sampling
    from unimoe_ray.model.quantize import convert_experts

    ckpt, tok_path, dac = prepare_artifacts(ArtifactsConfig(out_dir=str(tmp_path), preset="tiny", seed=2))
    tok = load_tokenizer(tok_path)
    model = convert_experts(new_model("tiny", tok, seed=2).eval(), None)
    in_memory = AudioGenerator(model, tok, DACCodec.load(dac))
    loaded = AudioGenerator.load(ckpt, tok_path, dac, dtype=torch.float32)
    sampling = task_sampling("music", max_frames=4, min_frames=0, seed=5)
    a, b = (g.music(["calm piano"], sampling=sampling)[0] for g in (in_memory, loaded))
    assert a.codes_KT.shape[0] == model.cfg.codec_channels and a.codes_KT.shape[1] >= 1
    assert torch.equal(a.codes_KT, b.codes_KT) and (a.wav == b.wav).all()
