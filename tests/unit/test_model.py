"""The assembled model: cache equivalence, loss, input validation, meta-device size."""

import pytest
import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.inference.generate import SamplingConfig, generate
from unimoe_ray.model.unimoe_audio import UniMoEAudio, mrope_position_ids
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompt import Prompt


def audio_batch(cfg, B=2, L=12, n_audio=6):
    ids = torch.randint(0, 400, (B, L))
    ids[:, L - n_audio :] = cfg.codec_placeholder_id
    codes = torch.full((B, cfg.codec_channels, L), cfg.codec_pad)
    codes[:, :, L - n_audio :] = torch.randint(0, 1024, (B, cfg.codec_channels, n_audio))
    return ids, codes


def test_incremental_cache_matches_full_forward(tiny_model, tiny_cfg):
    ids, codes = audio_batch(tiny_cfg)
    full = tiny_model(ids, codes).codec_logits_BLKV
    cache = tiny_model.new_cache(2, 32)
    parts = [tiny_model(ids[:, :5], codes[:, :, :5], cache=cache).codec_logits_BLKV]
    for t in range(5, 12):
        parts.append(tiny_model(ids[:, t : t + 1], codes[:, :, t : t + 1], cache=cache).codec_logits_BLKV)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_a_row(tiny_model, tiny_cfg):
    ids, codes = audio_batch(tiny_cfg, B=1)
    pad = 3
    ids_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    codes_p = torch.cat([torch.full((1, 12, pad), tiny_cfg.codec_pad), codes], 2)
    mask = torch.ones_like(ids_p, dtype=torch.bool)
    mask[:, :pad] = False
    a = tiny_model(ids, codes).codec_logits_BLKV
    b = tiny_model(ids_p, codes_p, attention_mask_BL=mask).codec_logits_BLKV[:, pad:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_greedy_generation_same_with_and_without_cache(tiny_model):
    prompts = [Prompt(torch.randint(0, 400, (7,))), Prompt(torch.randint(0, 400, (4,)))]
    negs = [Prompt(torch.randint(0, 400, (3,))), Prompt(torch.randint(0, 400, (5,)))]
    runs = [
        generate(tiny_model, prompts, negs, SamplingConfig(greedy=True, max_frames=10, use_cache=c))
        for c in (True, False)
    ]
    for a, b in zip(*runs):
        assert a.shape == (12, 10) and torch.equal(a, b)


def test_eos_ends_generation_and_respects_the_delay_pattern(tiny_model, tiny_cfg):
    # Make codebook 0 strongly prefer EOS: every row stops after one frame.
    head = tiny_model.codec_head
    bias = torch.zeros(12, 1027)
    bias[0, tiny_cfg.codec_eos] = 1e4
    head.bias = torch.nn.Parameter(bias.view(-1))
    out = generate(
        tiny_model,
        [Prompt(torch.arange(5))],
        None,
        SamplingConfig(guidance_scale=0, max_frames=50, min_frames=1, seed=0),
    )
    assert out[0].shape == (12, 1)  # EOS forbidden at step 0 (min_frames=1), taken at step 1
    assert out[0].max() < 1024


def test_sampling_is_seeded_and_bounded(tiny_model):
    p = [Prompt(torch.arange(6))]
    s = SamplingConfig(guidance_scale=0, max_frames=8, seed=3, top_k=5, top_p=0.9, temperature=0.8)
    a, b = generate(tiny_model, p, None, s), generate(tiny_model, p, None, s)
    assert torch.equal(a[0], b[0]) and a[0].shape[1] <= 8 and a[0].max() < 1024


def test_loss_and_backward(tiny_cfg):
    model = UniMoEAudio(tiny_cfg).init_weights(0).train()
    pat = DelayPattern(tiny_cfg.codec_delay_pattern)
    delayed = pat.apply(torch.randint(0, 1024, (12, 5)))  # (12, 24)
    S = delayed.shape[1]
    ids = torch.cat([torch.randint(0, 400, (4,)), torch.full((S,), tiny_cfg.codec_placeholder_id)])[None]
    codes = torch.full((1, 12, 4 + S), tiny_cfg.codec_pad)
    codes[0, :, 4] = tiny_cfg.codec_bos
    codes[0, :, 5:] = delayed[:, :-1]
    labels = torch.full_like(codes, -100)
    labels[0, :, 4:] = pat.labels(delayed)
    out = model(ids, codes, labels_BKL=labels, aux_weight=0.025, return_logits=False)
    assert out.codec_losses_K.shape == (12,)
    # Random init: each codebook's CE is about log(1027).
    assert out.codec_losses_K.mean().item() == pytest.approx(torch.log(torch.tensor(1027.0)).item(), rel=0.05)
    out.loss.backward()
    assert model.codec_head.weight.grad.abs().sum() > 0
    assert model.language_model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda ids, c: (ids, c[:, :8]), "Wrong codebook count"),
        (lambda ids, c: (ids, c.clamp(max=2000) + 1027), r"outside \[0, 1027\)"),
        (lambda ids, c: (ids[:, :0], None), "empty"),
        (lambda ids, c: (ids, None), "no audio_codes"),
        (lambda ids, c: (ids + 10_000, c), "vocab_size"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_model, tiny_cfg, mutate, match):
    ids, codes = audio_batch(tiny_cfg)
    with pytest.raises(ValueError, match=match):
        tiny_model(*mutate(ids, codes))


def test_empty_prompt_in_generation(tiny_model):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny_model, [Prompt(torch.zeros(0, dtype=torch.long))], None, SamplingConfig(guidance_scale=0))


def test_video_tokens_feed_the_vision_tower(tiny_model, tiny_cfg):
    grid = torch.tensor([[2, 4, 4]])  # 2 temporal × 4 × 4 patches → 2·2·2 = 8 merged tokens
    pixels = torch.randn(2 * 4 * 4, 3 * 2 * 14 * 14)
    ids = torch.cat([torch.arange(3), torch.full((8,), tiny_cfg.video_token_id), torch.arange(2)])[None]
    pos = mrope_position_ids(ids, video_token_id=tiny_cfg.video_token_id, video_grid_thw=grid, spatial_merge_size=2)
    assert pos[:, 0, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 0, 3:11].tolist() == [3, 3, 3, 3, 5, 5, 5, 5]  # time axis, interval 2
    assert pos[1, 0, 3:11].tolist() == [3, 3, 4, 4, 3, 3, 4, 4]
    assert pos[:, 0, 11].tolist() == [6, 6, 6]  # text resumes after the block's max
    out = tiny_model(ids, pixel_values_videos=pixels, video_grid_thw=grid, position_ids_3BL=pos)
    assert torch.isfinite(out.codec_logits_BLKV).all()
    with pytest.raises(ValueError, match="video tokens"):
        tiny_model(ids[:, :-4], pixel_values_videos=pixels, video_grid_thw=grid)


def test_preview_size_on_meta_device():
    with torch.device("meta"):
        model = UniMoEAudio(get_preset("preview"))
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 7.1e9) / 7.1e9 < 0.02
