"""inference/requests.assemble: the one place a request becomes prompt + negative prompt +
sampling, for AudioGenerator and the Serve runtime alike."""

import pytest
import torch

from unimoe_ray.inference.requests import VOICE_NEEDS_TRANSCRIPT, assemble
from unimoe_ray.inference.sampling import task_sampling
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import MUSIC_NEGATIVE, PromptBuilder, config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    tok = load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))
    return PromptBuilder(tok, config_for_tokenizer(get_preset("tiny"), tok))


def _same(a, b):
    return torch.equal(a.input_ids_L, b.input_ids_L)


def test_speech_with_a_voice_prompt(builder):
    voice_KT = torch.randint(0, 1024, (12, 5))
    prompt, negative, sampling = assemble(
        builder,
        "speech",
        "Hello.",
        voice_text="My voice.",
        voice_codes_KT=voice_KT,
        max_frames=50,
        overrides={"top_k": 7, "seed": None},
    )
    assert _same(prompt, builder.tts("Hello.", prompt_text="My voice.", prompt_codes_KT=voice_KT))
    assert _same(negative, builder.tts_negative(prompt_text="My voice.", prompt_codes_KT=voice_KT))
    # the released speech defaults, the frame cap, the override; min_frames (100) capped at 50
    assert sampling == task_sampling("speech", max_frames=50, top_k=7, min_frames=50)
    with pytest.raises(ValueError, match="needs its transcript"):
        assemble(builder, "speech", "Hello.", voice_text="  ", voice_codes_KT=voice_KT)
    assert "voice_text" in VOICE_NEEDS_TRANSCRIPT


def test_music_exact_length_and_given_sampling(builder):
    prompt, negative, sampling = assemble(builder, "music", "calm piano", max_frames=500, exact_length=True)
    assert _same(prompt, builder.music("calm piano")) and _same(negative, builder.music_negative())
    assert sampling.guidance_scale == 10.0 and sampling.min_frames == sampling.max_frames == 500
    assert MUSIC_NEGATIVE in builder.tok.decode(negative.input_ids_L)
    given = task_sampling("speech", top_k=3)
    assert assemble(builder, "music", "x", sampling=given)[2] is given  # used as given, not capped
    assert assemble(builder, "music", "x")[2] == task_sampling("music")


def test_bad_requests_name_the_fix(builder):
    with pytest.raises(ValueError, match="unknown task 'tts': use one of speech, music"):
        assemble(builder, "tts", "x")
    with pytest.raises(ValueError, match="a video goes with music"):
        assemble(builder, "speech", "x", video=(torch.zeros(1), torch.zeros(1)))


def test_one_task_vocabulary_maps_every_name_to_its_sampling_defaults():
    from unimoe_ray.inference.sampling import TASK_DEFAULTS
    from unimoe_ray.tasks import DATA_TASKS, TASK_ALIASES, sampling_task

    assert [sampling_task(t) for t in DATA_TASKS] == ["speech", "speech", "music", "v2m"]
    assert {sampling_task(t) for t in TASK_ALIASES} == set(TASK_DEFAULTS)
    assert sampling_task("text_to_music") == "music" and sampling_task("video_text_to_music") == "v2m"
    with pytest.raises(ValueError, match="unknown task 'asr': use one of tts_zh, tts_en"):
        sampling_task("asr")
