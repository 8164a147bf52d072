"""DACCodec on a random-weight small DAC: code layout, resampling, save/load, batching, errors."""

import math
import subprocess
import sys

import dac
import numpy as np
import pytest
import torch

from unimoe_ray.audio.codec import DAC_PATH_ENV, FRAME_RATE, HOP_LENGTH, DACCodec
from unimoe_ray.audio.io import resample

# How far (in frames) the small DAC's encoder looks right: a batch item's codes can differ from
# encoding it alone only this close to its end (see DACCodec.encode_batch).
ENCODER_RIGHT_CONTEXT_FRAMES = 8


@pytest.fixture(scope="module")
def codec():
    return DACCodec.random(seed=0)


def sine(seconds, sample_rate, hz=440.0):
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_layout(codec):
    assert codec.sample_rate == 16000
    assert codec.n_codebooks == 12
    assert codec.codebook_size == 1024
    assert codec.hop_length == 320
    assert codec.frame_rate == 50
    # the constants that code without a loaded codec reads (request limits, stored voices)
    assert (HOP_LENGTH, FRAME_RATE) == (codec.hop_length, codec.frame_rate)


def test_encode_one_second(codec):
    codes = codec.encode(sine(1.0, 16000), 16000)
    assert codes.shape == (12, 50)
    assert codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 1024


def test_encode_accepts_torch_and_pads_to_whole_frames(codec):
    wav = torch.from_numpy(sine(0.5, 16000))[:7777]
    codes = codec.encode(wav, 16000)
    assert codes.shape == (12, math.ceil(7777 / 320))  # 25: the partial last frame counts
    torch.testing.assert_close(codes, codec.encode(wav.numpy(), 16000), rtol=0, atol=0)


def test_encode_resamples_22050(codec):
    wav = sine(0.73, 22050)  # 16096 samples -> 11679 at 16 kHz
    codes = codec.encode(wav, 22050)
    n_16k = len(wav) * 16000 // 22050
    assert codes.shape == (12, math.ceil(n_16k / 320)) == (12, 37)
    expected = codec.encode(resample(wav, 22050, 16000), 16000)
    assert torch.equal(codes, expected)


def test_same_seed_same_weights():
    wav = sine(0.2, 16000)
    a = DACCodec.random(seed=3).encode(wav, 16000)
    b = DACCodec.random(seed=3).encode(wav, 16000)
    c = DACCodec.random(seed=4).encode(wav, 16000)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_leaves_global_rng_alone():
    state = torch.get_rng_state()
    DACCodec.random(seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_decode_shapes(codec):
    codes = codec.encode(sine(0.4, 16000), 16000)  # (12, 20)
    wav = codec.decode(codes)
    assert wav.dtype == np.float32 and wav.shape == (20 * 320,)
    assert np.abs(wav).max() <= 1.0  # DAC's decoder ends in tanh

    batch = codec.decode(torch.stack([codes, codes]))
    assert batch.shape == (2, 20 * 320)
    np.testing.assert_allclose(batch[1], wav, atol=1e-5)


def test_decode_numpy_codes_and_zero_frames(codec):
    codes = codec.encode(sine(0.1, 16000), 16000).numpy()
    assert codec.decode(codes).shape == (5 * 320,)
    assert codec.decode(np.zeros((12, 0), np.int64)).shape == (0,)


def test_decode_matches_dac_directly(codec):
    codes = codec.encode(sine(0.2, 16000), 16000)
    with torch.inference_mode():
        z = codec.model.quantizer.from_codes(codes[None])[0]
        expected = codec.model.decode(z)[0, 0].numpy()
    np.testing.assert_array_equal(codec.decode(codes), expected)


def test_save_load_round_trip(codec, tmp_path, monkeypatch):
    wav = sine(0.3, 16000, hz=220.0)
    path = codec.save(tmp_path / "dac16k.pth")

    loaded = DACCodec.load(path)
    assert torch.equal(loaded.encode(wav, 16000), codec.encode(wav, 16000))

    monkeypatch.setenv(DAC_PATH_ENV, str(path))
    from_env = DACCodec.load()
    assert torch.equal(from_env.encode(wav, 16000), codec.encode(wav, 16000))


def test_load_without_path_says_how_to_get_weights(monkeypatch):
    monkeypatch.delenv(DAC_PATH_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        DACCodec.load()
    message = str(err.value)
    assert "UNIMOE_DAC_PATH" in message
    assert "python -m dac download --model_type 16khz" in message


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth does not exist.*dac download"):
        DACCodec.load(tmp_path / "nope.pth")


def test_rejects_other_code_layouts():
    small_44k = dac.DAC(
        encoder_dim=4,
        encoder_rates=[2, 2],
        decoder_dim=8,
        decoder_rates=[2, 2],
        n_codebooks=4,
        codebook_size=16,
        sample_rate=44100,
    )
    expected = "16000 Hz DAC with 12 codebooks of 1024.*got 44100 Hz, 4 x 16"
    with pytest.raises(ValueError, match=expected):
        DACCodec(small_44k)


def test_decode_wrong_codebook_count(codec):
    with pytest.raises(ValueError, match="expected 12 codebooks, got 11"):
        codec.decode(torch.zeros(11, 5, dtype=torch.long))


@pytest.mark.parametrize("special", [1024, 1025, 1026, -1])
def test_decode_rejects_delay_pattern_specials(codec, special):
    codes = torch.zeros(12, 5, dtype=torch.long)
    codes[3, 2] = special
    expected = r"\[0, 1024\).*strip delay-pattern specials first \(DelayPattern.revert\)"
    with pytest.raises(ValueError, match=expected):
        codec.decode(codes)


def test_decode_rejects_bad_shapes_and_dtypes(codec):
    with pytest.raises(ValueError, match=r"\(K, T\) or \(B, K, T\)"):
        codec.decode(torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(torch.zeros(12, 5))


def test_encode_rejects_empty_and_multichannel(codec):
    with pytest.raises(ValueError, match="empty"):
        codec.encode(np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="1-D mono"):
        codec.encode(np.zeros((2, 100), np.float32), 16000)


def test_encode_batch_matches_single(codec):
    rng = np.random.default_rng(0)
    lengths = [16000, 12345, 15999, 8000, 321, 1, 16001]
    wavs = [(sine(n / 16000, 16000) + 0.05 * rng.standard_normal(n)).astype(np.float32) for n in lengths]

    batched = codec.encode_batch(wavs, 16000, batch_size=4)
    single = [codec.encode(w, 16000) for w in wavs]

    for n, b, s in zip(lengths, batched, single):
        frames = math.ceil(n / 320)
        assert b.shape == s.shape == (12, frames)
        # Bit-identical except near the item's end, where a batch pads with signal zeros
        # and a lone item with per-layer zeros (explained in encode_batch's docstring).
        interior = max(frames - ENCODER_RIGHT_CONTEXT_FRAMES, 0)
        assert torch.equal(b[:, :interior], s[:, :interior])
    # Sorted by length, batches are [1, 321, 8000, 12345] and [15999, 16000, 16001]; the
    # longest of each batch is padded exactly as when alone.
    assert torch.equal(batched[1], single[1])  # 12345
    assert torch.equal(batched[6], single[6])  # 16001


def test_encode_batch_resamples_each_item(codec):
    wavs = [sine(0.5, 22050), sine(0.2, 22050)]
    batched = codec.encode_batch(wavs, 22050)
    assert [c.shape[1] for c in batched] == [25, 10]


def test_audio_package_does_not_import_ray():
    code = (
        "import sys, unimoe_ray.audio.codec, unimoe_ray.audio.io; "
        "assert 'ray' not in sys.modules, 'unimoe_ray.audio imported ray'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
