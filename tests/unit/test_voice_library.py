"""The ingress's shipped voices (serve/voice_library.py) without Ray: the generated default voice
or a library file is DAC-encoded once into the voice store, voices already there are skipped,
and a voice another replica stored first is not an error."""

import asyncio
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from unimoe_ray.audio.io import write_wav
from unimoe_ray.audio.synth import reference_voice
from unimoe_ray.serve.settings import IngressSettings
from unimoe_ray.serve.voice_library import codes_tensor, ship_voices
from unimoe_ray.serve.voices import LIBRARY, VoiceStore, VoiceStoreError


class FakeEncoder:
    """The speech deployment's encode_voice: codes whose first value is the clip's length, so a
    test can tell which audio was encoded."""

    def __init__(self, before_return=None) -> None:
        self.calls: list[tuple[int, float]] = []
        self.before_return = before_return

    async def __call__(self, data: bytes, max_seconds: float) -> np.ndarray:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32")
        self.calls.append((len(wav), max_seconds))
        if self.before_return is not None:
            self.before_return()
        codes = np.zeros((12, 4), dtype=np.int16)
        codes[0, 0] = len(wav) // 100
        return codes


def _ship(store, settings, encoder):
    asyncio.run(ship_voices(store, settings, encoder))


def test_the_default_voice_is_generated_encoded_once_and_stored(tmp_path):
    settings = IngressSettings(voices_dir=str(tmp_path))
    store = VoiceStore(tmp_path, max_voices=5)
    encoder = FakeEncoder()
    _ship(store, settings, encoder)
    assert encoder.calls == [(32000, 600.0)]  # reference_voice(seconds=2.0) at 16 kHz
    voice, codes = store.get("default", owner="anyone")
    assert voice.ref_text == "This is my voice." and store.find("default", owner=LIBRARY) is not None
    assert codes.shape == (12, 4) and int(codes[0, 0]) == 320
    _ship(store, settings, encoder)  # already stored: not encoded again
    assert len(encoder.calls) == 1


def test_a_library_file_is_shipped_instead_of_the_default(tmp_path):
    write_wav(tmp_path / "n.wav", reference_voice(seconds=1.0), 16000)
    (tmp_path / "lib.json").write_text(
        json.dumps({"voices": {"narrator": {"audio_path": "n.wav", "prompt": "Once upon a time."}}})
    )
    settings = IngressSettings(voices_dir=str(tmp_path / "voices"), voice_library=str(tmp_path / "lib.json"))
    store = VoiceStore(tmp_path / "voices", max_voices=5)
    encoder = FakeEncoder()
    _ship(store, settings, encoder)
    assert [v.name for v in store.list()] == ["narrator"] and encoder.calls == [(16000, 600.0)]
    assert not (tmp_path / "voices" / "_library").exists()  # no default voice written


def test_no_library_and_no_default_ships_nothing(tmp_path):
    settings = IngressSettings(voices_dir=str(tmp_path), ship_default_voice=False)
    store = VoiceStore(tmp_path, max_voices=5)
    encoder = FakeEncoder()
    _ship(store, settings, encoder)
    assert store.list() == [] and encoder.calls == []


def test_a_voice_another_replica_stored_first_is_not_an_error(tmp_path):
    settings = IngressSettings(voices_dir=str(tmp_path))
    store = VoiceStore(tmp_path, max_voices=5)
    # While this replica encodes, another one (same folder) stores the voice.
    other = FakeEncoder(
        before_return=lambda: store.add("default", "Stored first.", torch.zeros(12, 2), origin="library")
    )
    _ship(store, settings, other)
    assert [v.ref_text for v in store.list()] == ["Stored first."]


def test_other_store_errors_still_raise(tmp_path):
    settings = IngressSettings(voices_dir=str(tmp_path))
    store = VoiceStore(tmp_path, max_voices=5)

    def fail(*a, **k):
        raise VoiceStoreError("disk full", status=500)

    store.add = fail
    with pytest.raises(VoiceStoreError, match="disk full"):
        _ship(store, settings, FakeEncoder())


def test_codes_tensor_copies_read_only_arrays():
    codes = np.arange(6, dtype=np.int16).reshape(2, 3)
    codes.flags.writeable = False  # as Ray hands them over
    t = codes_tensor(codes)
    assert t.dtype == torch.long and t.tolist() == [[0, 1, 2], [3, 4, 5]]
    t[0, 0] = 9  # a copy: writable, and the array is untouched
    assert codes[0, 0] == 0
