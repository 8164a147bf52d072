"""WAV read/write/resample: exact round trips, mono mixing, and clear errors for bad files."""

import numpy as np
import pytest
import soundfile as sf

from unimoe_ray.audio.io import AudioError, read_audio, resample, write_wav

PCM16_STEP = 1 / 32768


def test_write_read_round_trip_is_16bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    wav = rng.uniform(-1, 1, 4000).astype(np.float32)
    wav[:3] = [1.0, -1.0, 0.0]
    path = tmp_path / "a.wav"

    write_wav(path, wav, sample_rate=22050)
    back, sr = read_audio(path)

    assert sf.info(path).subtype == "PCM_16"
    assert sr == 22050
    assert back.dtype == np.float32 and back.shape == wav.shape
    assert np.abs(back - wav).max() <= PCM16_STEP
    # Away from +1 (which 16-bit PCM cannot hold) the error is at most half a step.
    assert np.abs(back[1:] - wav[1:]).max() <= PCM16_STEP / 2


def test_write_clips_to_unit_range(tmp_path):
    path = tmp_path / "loud.wav"
    write_wav(path, np.array([1.5, -2.0, 0.5], np.float32))
    back, sr = read_audio(path)
    assert sr == 16000
    np.testing.assert_array_equal(back, [32767 / 32768, -1.0, 0.5])


def test_write_rejects_multichannel(tmp_path):
    with pytest.raises(ValueError, match="1-D mono"):
        write_wav(tmp_path / "x.wav", np.zeros((2, 100), np.float32))


def test_stereo_is_mixed_to_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    left = np.full(100, 0.5, np.float32)
    right = np.full(100, -0.25, np.float32)
    sf.write(path, np.stack([left, right], axis=1), 8000, subtype="FLOAT")

    mono, sr = read_audio(path)

    assert sr == 8000 and mono.shape == (100,) and mono.dtype == np.float32
    np.testing.assert_array_equal(mono, np.full(100, 0.125, np.float32))


def test_missing_file_names_path_and_cause(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match=r"nope\.wav.*does not exist"):
        read_audio(path)


def test_corrupt_file_is_audio_error(tmp_path):
    path = tmp_path / "bad.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match=r"bad\.wav.*unreadable or corrupt"):
        read_audio(path)


def test_zero_byte_file_is_audio_error(tmp_path):
    path = tmp_path / "zero.wav"
    path.touch()
    with pytest.raises(AudioError, match="unreadable or corrupt"):
        read_audio(path)


def test_empty_audio_is_audio_error(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"empty\.wav.*0 samples"):
        read_audio(path)


def test_audio_error_is_value_error():
    assert issubclass(AudioError, ValueError)


def test_resample_sine_22050_to_16000():
    t_in = np.arange(22050) / 22050
    wav = np.sin(2 * np.pi * 440 * t_in).astype(np.float32)

    out = resample(wav, 22050, 16000)

    assert out.dtype == np.float32 and out.shape == (16000,)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    # The filter's edges see zeros beyond the signal; compare the interior.
    np.testing.assert_allclose(out[200:-200], expected[200:-200], atol=1e-2)


def test_resample_same_rate_is_identity():
    wav = np.linspace(-1, 1, 50, dtype=np.float32)
    np.testing.assert_array_equal(resample(wav, 16000, 16000), wav)
