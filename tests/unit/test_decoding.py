"""Decoding as the released `generate` (issue 8): EOS rules, minimum and maximum length, EOS
logit factor, top-k / top-p edges, task defaults, voice-prompt layout. The codec head's weight
is zeroed so its bias alone sets the logits: each rule is then checked on exact values."""

import pytest
import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.inference.generate import generate
from unimoe_ray.inference.sampling import RowKnobs, SamplingConfig, process_logits, task_sampling
from unimoe_ray.text.prompt import Prompt

K, V, EOS = 12, 1027, 1024


def force_logits(model, **values):
    """Codec logits fixed to `values` ({(codebook, code): logit}); everything else at -30."""
    head = model.codec_head
    with torch.no_grad():
        head.weight.zero_()
    bias = torch.full((K, V), -30.0)
    bias[:, 0] = 0.0  # a real code every codebook can always sample
    for (c, code), v in values.get("logits", {}).items():
        bias[c, code] = v
    head.bias = torch.nn.Parameter(bias.view(-1))


def run(model, **sampling):
    s = SamplingConfig(guidance_scale=0, seed=0, **sampling)
    return generate(model, [Prompt(torch.arange(5))], None, s)[0]


def test_a_head_that_always_prefers_eos_gives_exactly_min_frames(tiny_model):
    force_logits(tiny_model, logits={(0, EOS): 50.0})
    for m in (1, 7, 23):
        assert run(tiny_model, min_frames=m).shape == (K, m)


def test_a_head_that_never_prefers_eos_runs_to_the_released_maximum(tiny_model, tiny_cfg):
    force_logits(tiny_model, logits={(0, EOS): -5.0})
    max_delay = max(tiny_cfg.codec_delay_pattern)
    # The released rule: EOS forced at step max_tokens − max_delay → that many frames minus 1
    # (1000 → 981 for the preview).
    assert SamplingConfig().frame_limit(18) == 981
    assert run(tiny_model, min_frames=0, max_tokens=60).shape == (K, 60 - max_delay - 1)
    assert run(tiny_model, min_frames=0, max_tokens=60, max_frames=9).shape == (K, 9)


def test_eos_is_sampled_only_when_it_is_the_highest_logit(tiny_model):
    # EOS second-highest with a large share of the mass (≈ 27% after top-k 2): the released rule
    # never samples it; 30 frames of chances would hit it almost surely otherwise.
    force_logits(tiny_model, logits={(0, EOS): 5.0, (0, 0): 6.0})
    codes = run(tiny_model, min_frames=0, max_tokens=49, top_k=2)
    assert codes.shape == (K, 49 - 18 - 1)


def test_eos_logit_factor_applies_to_the_logit_after_guidance():
    # factor 0.6 raises a negative EOS logit above the best code; 1.0 leaves it below.
    cond = torch.full((1, K, V), -30.0)
    cond[0, :, 0] = -1.5
    cond[0, 0, EOS] = -2.0
    uncond = cond.clone()
    uncond[0, 0, EOS] = -1.0  # guided EOS: -2 + 1·(-2 - -1) = -3; × 0.6 = -1.8 (< -1.5)
    step = torch.tensor([5])

    def kn(f, g):
        return RowKnobs.stack([SamplingConfig(eos_factor=f, guidance_scale=g, min_frames=0)])

    def top(logits):
        return int(logits[0, 0].argmax())

    assert top(process_logits(cond, None, kn(0.6, 0.0), step, eos=EOS)) == EOS  # -1.2 > -1.5
    assert process_logits(cond, None, kn(1.0, 0.0), step, eos=EOS)[0, 0, EOS] == float("-inf")
    out = process_logits(cond, uncond, kn(0.6, 1.0), step, eos=EOS)
    assert top(out) == 0 and out[0, 0, EOS] == float("-inf")  # -1.8: not the top, so dropped
    out = process_logits(cond, uncond, kn(0.4, 1.0), step, eos=EOS)  # -3 × 0.4 = -1.2
    assert top(out) == EOS and out[0, 0, EOS] == pytest.approx(-1.2)


def test_eos_forbidden_before_min_frames_and_pad_bos_never_sampled():
    cond = torch.zeros(1, K, V)
    cond[0, 0, EOS] = 100.0
    knobs = RowKnobs.stack([SamplingConfig(min_frames=3)])
    before = process_logits(cond, None, knobs, torch.tensor([2]), eos=EOS)
    after = process_logits(cond, None, knobs, torch.tensor([3]), eos=EOS)
    assert before[0, 0, EOS] == float("-inf") and after[0, 0, EOS] == 100.0
    assert (after[:, :, EOS + 1 :] == float("-inf")).all() and (after[:, 1:, EOS] == float("-inf")).all()


def test_top_k_keeps_exactly_k_even_on_ties():
    logits = torch.zeros(1, K, V)  # all 1024 codes tied
    out = process_logits(logits, None, RowKnobs.stack([SamplingConfig(top_k=45)]), torch.tensor([0]), eos=EOS)
    assert ((out > float("-inf")).sum(-1) == 45).all()


def test_top_p_drops_a_token_only_when_the_mass_before_it_is_strictly_above_p():
    logits = torch.full((1, K, V), -1e9)
    logits[0, :, :4] = 0.0  # four codes at exactly 0.25: mass before them 0, .25, .5, .75
    out = process_logits(logits, None, RowKnobs.stack([SamplingConfig(top_p=0.5)]), torch.tensor([0]), eos=EOS)
    # .5 is not above .5: the third code stays; the fourth (.75 before it) goes.
    assert (out[0, :, :4] > float("-inf")).sum(-1).tolist() == [3] * K


def test_rows_keep_their_own_knobs_in_one_batch():
    logits = torch.zeros(2, K, V)
    knobs = RowKnobs.stack([SamplingConfig(top_k=3), SamplingConfig(top_k=10)])
    out = process_logits(logits, None, knobs, torch.tensor([0, 0]), eos=EOS)
    assert (out[0] > float("-inf")).sum(-1).tolist() == [3] * K
    assert (out[1] > float("-inf")).sum(-1).tolist() == [10] * K


def test_released_task_defaults():
    speech, music, v2m = (task_sampling(t) for t in ("speech", "music", "v2m"))
    assert (speech.guidance_scale, speech.eos_factor, speech.min_frames) == (1.0, 1.0, 100)
    assert (music.guidance_scale, music.eos_factor, music.min_frames) == (10.0, 0.6, 400)
    assert v2m == music
    for s in (speech, music):
        assert (s.top_k, s.top_p, s.temperature, s.max_tokens) == (45, 1.0, 1.0, 1000)
    assert task_sampling("music", top_k=5, temperature=None).top_k == 5
    with pytest.raises(ValueError, match="unknown task"):
        task_sampling("podcast")


def test_voice_prompt_codes_enter_delay_patterned_as_released():
    pat = DelayPattern((0, 2), bos=9, eos=8, pad=7)
    codes = torch.tensor([[1, 2], [3, 4]])
    # released _preprocess_codec: BOS for delay+1 steps, codes, EOS (if it fits), PAD.
    assert pat.voice_prompt(codes).tolist() == [[9, 1, 2, 8, 7], [9, 9, 9, 3, 4]]


def test_prompt_builder_places_one_placeholder_per_delayed_step(tiny_cfg, tmp_path):
    from unimoe_ray.text.prompts import PromptBuilder, config_for_tokenizer
    from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer

    tok = load_tokenizer(build_test_tokenizer(tmp_path / "tok"))
    cfg = config_for_tokenizer(tiny_cfg, tok)
    pb = PromptBuilder(tok, cfg)
    codes = torch.randint(0, 1024, (K, 30))
    p = pb.tts("hello there", prompt_text="my voice", prompt_codes_KT=codes)
    slots = (p.input_ids_L == cfg.codec_placeholder_id).nonzero().flatten()
    assert len(slots) == 30 + max(cfg.codec_delay_pattern) + 1
    placed = p.audio_codes_KL[:, slots]
    assert torch.equal(placed, pb.pattern.voice_prompt(codes))
    # Dropping the leading BOS step leaves the training-time pattern minus its last step.
    tail = torch.full((K, 1), cfg.codec_pad)
    assert torch.equal(pb.pattern.revert(torch.cat([placed[:, 1:], tail], 1)), codes)


def test_generate_rejects_bad_sampling():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingConfig(max_tokens=10).frame_limit(18)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="min_frames"):
        SamplingConfig(min_frames=-1)
