"""The server's voice registry: named reference voices stored as DAC codes.

A voice is DAC-encoded once, when it is registered, and kept as `<id>.safetensors` in the
server's own storage folder (the codes as int16, name / transcript / origin in the metadata),
so it survives restarts and every replica reads the same folder. Voices from a voice library
file (inference/voices.py, the released prompt_audios.json form) are encoded into the same
folder at start-up, marked `library` (they cannot be deleted through the API).

The store only ever reads files it wrote itself; clients send audio bytes, never paths.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unimoe_ray.inference.voices import voice_key

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")


class VoiceStoreError(ValueError):
    """status: the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredVoice:
    id: str
    name: str
    ref_text: str
    origin: str  # "upload" | "library"
    created_at: int
    frames: int

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "ref_text": self.ref_text, "origin": self.origin,
                "created_at": self.created_at, "frames": self.frames, "seconds": self.frames / 50}


class VoiceStore:
    def __init__(self, folder: str | Path, *, max_voices: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_voices = max_voices
        self._lock = threading.Lock()

    def _read(self, path: Path) -> tuple[StoredVoice, torch.Tensor] | None:
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:
            return None  # a half-written or foreign file is not a voice
        codes = tensors.get("codes_KT")
        if codes is None or "name" not in meta:
            return None
        v = StoredVoice(id=path.stem, name=meta["name"], ref_text=meta.get("ref_text", ""),
                        origin=meta.get("origin", "upload"), created_at=int(meta.get("created_at", 0)),
                        frames=int(codes.shape[1]))
        return v, codes

    def list(self) -> list[StoredVoice]:
        out = [r[0] for p in sorted(self.folder.glob("*.safetensors")) if (r := self._read(p))]
        return sorted(out, key=lambda v: (v.origin != "library", v.created_at, v.name))

    def find(self, name_or_id: str) -> StoredVoice | None:
        key = voice_key(name_or_id)
        for v in self.list():
            if v.id == name_or_id or voice_key(v.name) == key:
                return v
        return None

    def get(self, name_or_id: str) -> tuple[StoredVoice, torch.Tensor]:
        v = self.find(name_or_id)
        if v is None:
            names = [x.name for x in self.list()]
            raise VoiceStoreError(
                f"unknown voice {name_or_id!r}: registered voices are {names}; upload one with "
                "POST /v1/audio/voices", status=404,
            )
        rec = self._read(self.folder / f"{v.id}.safetensors")
        if rec is None:
            raise VoiceStoreError(f"voice {name_or_id!r} was deleted meanwhile", status=404)
        return rec[0], rec[1].long()

    def add(self, name: str, ref_text: str, codes_KT: torch.Tensor, *, origin: str = "upload") -> StoredVoice:
        if not _NAME.match(name or ""):
            raise VoiceStoreError(
                f"voice name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', starting "
                "with a letter or digit", status=400)
        if not ref_text.strip():
            raise VoiceStoreError("ref_text is empty: give the transcript of the audio sample (the model reads both)")
        with self._lock:
            existing = self.list()
            if any(voice_key(v.name) == voice_key(name) for v in existing):
                raise VoiceStoreError(f"a voice named {name!r} exists: delete it first or pick another name", 409)
            uploads = sum(v.origin == "upload" for v in existing)
            if origin == "upload" and uploads >= self.max_voices:
                raise VoiceStoreError(
                    f"voice limit reached ({self.max_voices} uploaded voices): delete one first "
                    "(DELETE /v1/audio/voices/{name}) or raise max_voices in the server config", 409)
            vid = f"voice_{uuid.uuid4().hex[:16]}"
            meta = {"name": name, "ref_text": ref_text, "origin": origin, "created_at": str(int(time.time()))}
            tmp = self.folder / f".{vid}.tmp"
            save_file({"codes_KT": codes_KT.to(torch.int16).contiguous()}, str(tmp), metadata=meta)
            os.replace(tmp, self.folder / f"{vid}.safetensors")  # atomic: readers never see half a file
        return self._read(self.folder / f"{vid}.safetensors")[0]

    def delete(self, name_or_id: str) -> StoredVoice:
        with self._lock:
            v = self.find(name_or_id)
            if v is None:
                raise VoiceStoreError(f"voice {name_or_id!r} not found", status=404)
            if v.origin == "library":
                raise VoiceStoreError(
                    f"voice {v.name!r} comes from the server's voice library file: remove it there", 403)
            (self.folder / f"{v.id}.safetensors").unlink(missing_ok=True)
        return v
