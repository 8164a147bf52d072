"""Voice libraries: named reference voices (a WAV + its transcript) for voice-cloned TTS.

Two file forms are read:
- the released `examples/prompt_audios.json` form, nested language → gender:
  ``{"audio_prompts": {"english": {"male": {"prompt": "...", "audio_path": "...", ...}}}}``;
  each entry is named ``{language}_{gender}`` (``english_male``) — the web demo's "English
  Male" spelling resolves too (case and spaces are folded to ``_``);
- a flat form: ``{"voices": {"narrator": {"audio_path": "...", "prompt": "..."}}}``.

Relative audio paths resolve against `root` (default: the library file's folder). The released
file's paths are relative to the repository root (``assets/prompt_audios/en_male.wav``), so
point `root` at the released checkout: ``VoiceLibrary.load("UniMoE-Audio/examples/
prompt_audios.json", root="UniMoE-Audio")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class VoiceError(ValueError):
    """An unknown voice or an unusable library entry; the message names the fix."""


@dataclass(frozen=True)
class Voice:
    name: str
    audio_path: Path
    transcript: str
    language: str | None = None
    gender: str | None = None


def voice_key(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


class VoiceLibrary:
    def __init__(self, voices: dict[str, Voice]) -> None:
        self.voices = {voice_key(k): v for k, v in voices.items()}

    @classmethod
    def load(cls, path: str | Path, *, root: str | Path | None = None) -> "VoiceLibrary":
        path = Path(path)
        if not path.is_file():
            raise VoiceError(f"voice library {path} does not exist: pass a prompt_audios.json-style file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise VoiceError(f"voice library {path} is not valid JSON: {err}") from None
        base = Path(root) if root is not None else path.parent
        entries: dict[str, dict] = {}
        if isinstance(data, dict) and isinstance(data.get("audio_prompts"), dict):
            for language, by_gender in data["audio_prompts"].items():
                for gender, entry in (by_gender or {}).items():
                    entries[f"{language}_{gender}"] = dict(
                        entry, language=entry.get("language", language), gender=entry.get("gender", gender)
                    )
        elif isinstance(data, dict) and isinstance(data.get("voices"), dict):
            entries = dict(data["voices"])
        else:
            raise VoiceError(
                f"voice library {path}: expected {{'audio_prompts': {{language: {{gender: entry}}}}}} "
                "(the released prompt_audios.json) or {'voices': {name: entry}}"
            )
        voices = {}
        for name, e in entries.items():
            if not isinstance(e, dict) or "audio_path" not in e or "prompt" not in e:
                raise VoiceError(f"voice {name!r} in {path} needs 'audio_path' and 'prompt' (its transcript)")
            audio = Path(e["audio_path"])
            voices[name] = Voice(
                name=voice_key(name),
                audio_path=audio if audio.is_absolute() else base / audio,
                transcript=str(e["prompt"]),
                language=e.get("language"),
                gender=e.get("gender"),
            )
        return cls(voices)

    def names(self) -> list[str]:
        return sorted(self.voices)

    def get(self, name: str) -> Voice:
        key = voice_key(name)
        if key not in self.voices:
            raise VoiceError(f"unknown voice {name!r}: this library has {self.names()}")
        voice = self.voices[key]
        if not voice.audio_path.is_file():
            raise VoiceError(
                f"voice {name!r}: its audio file {voice.audio_path} does not exist (relative paths "
                "resolve against the library's root; pass root= / --voice-root)"
            )
        return voice

    def __contains__(self, name: str) -> bool:
        return voice_key(name) in self.voices
