"""The server's voice registry: named reference voices stored as DAC codes.

A voice is DAC-encoded once, when it is registered, and kept as `<id>.safetensors` in the
server's own storage folder (the codes as int16, name / transcript / origin in the metadata),
so it survives restarts and every replica reads the same folder. Voices from a voice library
file (inference/voices.py, the released prompt_audios.json form) are encoded into the same
folder at start-up, marked `library` (they cannot be deleted through the API).

Owners: an uploaded voice belongs to the caller that uploaded it — `owner` in its metadata is
the caller's id (serve/auth.key_owner: a hash prefix of its API key, never the key), or
`ANONYMOUS` with auth off (all auth-off uploads share it). A caller sees (list, get, use,
delete) its own uploads plus the library voices, which everyone shares read-only; another
owner's voice is "not found", by name and by id, so its existence does not leak. Names are
unique per owner (two keys may each have "alice"); library names are global: no upload may
take one. A library voice added later than an upload of the same name shadows that name for
its owner (the upload stays reachable by id). Voices stored before owners existed carry none
and belong to `ANONYMOUS`: readable with auth off only. `max_voices` caps each owner's uploads.

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
from safetensors import safe_open
from safetensors.torch import save_file

from unimoe_ray.audio.codec import FRAME_RATE
from unimoe_ray.inference.voices import voice_key

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")
ANONYMOUS = "anonymous"  # the owner of auth-off uploads and of voices stored without an owner
LIBRARY = "library"  # the owner recorded on library voices (shared by every caller)


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
    owner: str = ANONYMOUS

    def visible_to(self, owner: str) -> bool:
        return self.origin == "library" or self.owner == owner

    def public(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "ref_text": self.ref_text,
            "origin": self.origin,
            "created_at": self.created_at,
            "frames": self.frames,
            "seconds": self.frames / FRAME_RATE,
        }


class VoiceStore:
    def __init__(self, folder: str | Path, *, max_voices: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_voices = max_voices
        self._lock = threading.Lock()

    def _read(self, path: Path, *, codes: bool = False) -> tuple[StoredVoice, torch.Tensor | None] | None:
        """The voice in `path` (its codes only when asked: listing reads the header alone)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if "codes_KT" not in f.keys() or "name" not in meta:
                    return None
                frames = int(f.get_slice("codes_KT").get_shape()[1])
                codes_KT = f.get_tensor("codes_KT") if codes else None
        except Exception:
            return None  # a half-written or foreign file is not a voice
        origin = meta.get("origin", "upload")
        v = StoredVoice(
            id=path.stem,
            name=meta["name"],
            ref_text=meta.get("ref_text", ""),
            origin=origin,
            created_at=int(meta.get("created_at", 0)),
            frames=frames,
            owner=meta.get("owner", LIBRARY if origin == "library" else ANONYMOUS),
        )
        return v, codes_KT

    def _all(self) -> list[StoredVoice]:
        out = [r[0] for p in sorted(self.folder.glob("*.safetensors")) if (r := self._read(p))]
        return sorted(out, key=lambda v: (v.origin != "library", v.created_at, v.name))

    def list(self, *, owner: str = ANONYMOUS) -> list[StoredVoice]:
        """The voices `owner` sees: the library's, then its own uploads, oldest first."""
        return [v for v in self._all() if v.visible_to(owner)]

    def find(self, name_or_id: str, *, owner: str = ANONYMOUS) -> StoredVoice | None:
        key = voice_key(name_or_id)
        for v in self.list(owner=owner):
            if v.id == name_or_id or voice_key(v.name) == key:
                return v
        return None

    def get(self, name_or_id: str, *, owner: str = ANONYMOUS) -> tuple[StoredVoice, torch.Tensor]:
        v = self.find(name_or_id, owner=owner)
        if v is None:
            names = [x.name for x in self.list(owner=owner)]
            raise VoiceStoreError(
                f"unknown voice {name_or_id!r}: your voices are {names}; upload one with POST /v1/audio/voices",
                status=404,
            )
        rec = self._read(self.folder / f"{v.id}.safetensors", codes=True)
        if rec is None:
            raise VoiceStoreError(f"voice {name_or_id!r} was deleted meanwhile", status=404)
        return rec[0], rec[1].long()

    def add(
        self, name: str, ref_text: str, codes_KT: torch.Tensor, *, owner: str = ANONYMOUS, origin: str = "upload"
    ) -> StoredVoice:
        """Store a voice for `owner` (ignored for origin "library": those belong to LIBRARY).
        409 when the name is taken (by a library voice, or for an upload by the owner's own)
        or the owner already has `max_voices` uploads."""
        if not ref_text.strip():
            raise VoiceStoreError("ref_text is empty: give the transcript of the audio sample (the model reads both)")
        owner = LIBRARY if origin == "library" else owner
        with self._lock:
            self.check_can_add(name, owner=owner, origin=origin)  # again: another upload may have landed
            vid = f"voice_{uuid.uuid4().hex[:16]}"
            meta = {
                "name": name,
                "ref_text": ref_text,
                "origin": origin,
                "owner": owner,
                "created_at": str(int(time.time())),
            }
            tmp = self.folder / f".{vid}.tmp"
            save_file({"codes_KT": codes_KT.to(torch.int16).contiguous()}, str(tmp), metadata=meta)
            os.replace(tmp, self.folder / f"{vid}.safetensors")  # atomic: readers never see half a file
        return self._read(self.folder / f"{vid}.safetensors")[0]

    def check_can_add(self, name: str, *, owner: str = ANONYMOUS, origin: str = "upload") -> None:
        """The checks `add` makes before it stores anything — the name's form (400), a name taken
        (409) and `owner`'s upload cap (409) — for a caller to make before the costly DAC encode."""
        if not _NAME.match(name or ""):
            raise VoiceStoreError(
                f"voice name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', starting "
                "with a letter or digit",
                status=400,
            )
        if origin not in ("upload", "library"):
            raise ValueError(f"origin={origin!r}: 'upload' or 'library'")
        owner = LIBRARY if origin == "library" else owner
        # A library voice competes with library voices only; an upload with those and its owner's.
        existing = [v for v in self._all() if v.origin == "library" or (origin == "upload" and v.owner == owner)]
        if any(voice_key(v.name) == voice_key(name) for v in existing):
            raise VoiceStoreError(f"a voice named {name!r} exists: delete it first or pick another name", 409)
        uploads = sum(v.origin == "upload" for v in existing)
        if origin == "upload" and uploads >= self.max_voices:
            raise VoiceStoreError(
                f"voice limit reached ({self.max_voices} uploaded voices for this API key): delete one "
                "first (DELETE /v1/audio/voices/{name}) or raise max_voices in the server config",
                409,
            )

    def delete(self, name_or_id: str, *, owner: str = ANONYMOUS) -> StoredVoice:
        """Remove one of `owner`'s uploads: 404 when `owner` cannot see it, 403 for a library voice."""
        with self._lock:
            v = self.find(name_or_id, owner=owner)
            if v is None:
                raise VoiceStoreError(f"voice {name_or_id!r} not found", status=404)
            if v.origin == "library":
                raise VoiceStoreError(
                    f"voice {v.name!r} comes from the server's voice library file: remove it there", 403
                )
            (self.folder / f"{v.id}.safetensors").unlink(missing_ok=True)
        return v
