"""The voices a deployment ships: encoded into the ingress's voice store once per replica, lazily
(the speech model must be up to DAC-encode them). From `voice_library` (a prompt_audios.json-style
file, paths under `voice_root`), or, with none and `ship_default_voice`, one generated voice
named "default"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from unimoe_ray.serve import formats
from unimoe_ray.serve.settings import IngressSettings
from unimoe_ray.serve.voices import LIBRARY, VoiceStore, VoiceStoreError


def codes_tensor(codes):
    """DAC codes a model replica returned, as a (K, T) long tensor the voice store keeps."""
    import torch

    return torch.as_tensor(np.array(codes)).long()  # a copy: Ray hands read-only arrays


async def ship_voices(
    store: VoiceStore, settings: IngressSettings, encode_voice: Callable[[bytes, float], Awaitable]
) -> None:
    """Add the shipped voices `store` lacks. encode_voice(audio file bytes, max seconds): the
    speech deployment's DAC encoder (awaited: codes for one voice)."""
    from unimoe_ray.audio.io import read_audio, write_wav
    from unimoe_ray.inference.voices import VoiceLibrary

    path = settings.voice_library
    if path is None and settings.ship_default_voice:
        from unimoe_ray.audio.synth import reference_voice

        lib_dir = Path(settings.voices_dir) / "_library"
        lib_dir.mkdir(parents=True, exist_ok=True)
        write_wav(lib_dir / "default.wav", reference_voice(seconds=2.0), 16000)
        (lib_dir / "voices.json").write_text(
            json.dumps({"voices": {"default": {"audio_path": "default.wav", "prompt": "This is my voice."}}})
        )
        path = str(lib_dir / "voices.json")
    if path is not None:
        library = VoiceLibrary.load(path, root=settings.voice_root)
        for name in library.names():
            if store.find(name, owner=LIBRARY) is not None:
                continue
            voice = library.get(name)
            wav, sr = read_audio(voice.audio_path)
            data = formats.encode(wav, "wav", sr)
            codes = await encode_voice(data, 600.0)
            try:
                store.add(voice.name, voice.transcript, codes_tensor(codes), origin="library")
            except VoiceStoreError as err:
                if err.status != 409:  # another replica stored it first
                    raise
