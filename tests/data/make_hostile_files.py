"""Writes tests/data/hostile/: hand-made files that once hurt (or could hurt) the Serve API's upload
paths, each with the refusal tests/unit/test_uploads.py expects. Every byte is written here with
struct (no encoder library), so the files are the same on every machine; a test regenerates them
and compares.

    python tests/data/make_hostile_files.py [out_dir]     # default: tests/data/hostile

Audio (POST /v1/audio/voices `audio_sample`, inline `reference_audio`):
  sample_rate_bomb.wav  4 KB, header rate 999983 Hz (julius' resampling filter to 16 kHz: 64 GB)
  silence_3h.flac       3 hours of 8 kHz silence in 19 KB (constant FLAC subframes of 65535 samples)
  truncated.wav         header declares 20 s of 16 kHz audio, the file holds 0.5 s
  channels_8.wav        8 channels (the limit: accepted), channels_9.wav: 9 (refused)
  rate_4hz.wav          a 4 Hz sample rate
  garbage.bin           4096 seeded random bytes
Video (POST /v1/audio/music `video`):
  playlist.m3u8         an HLS playlist whose segment is http://127.0.0.1:9/x.ts
  text.mp4              a text file named .mp4
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np


def wav(samples_NC: np.ndarray, rate: int, *, declared_bytes: int | None = None) -> bytes:
    """A canonical 44-byte-header PCM16 WAV; `declared_bytes` overrides the data chunk's size."""
    samples_NC = np.asarray(samples_NC, dtype="<i2")
    channels = samples_NC.shape[1]
    data = samples_NC.tobytes()
    size = len(data) if declared_bytes is None else declared_bytes
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", size)
        + data
    )


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    """int16 (N, C): a sine at `freq`, channel c scaled by (c + 1) / C."""
    t = np.arange(round(seconds * rate)) / rate
    scale = (np.arange(channels) + 1) / channels
    return np.round(8000 * np.sin(2 * np.pi * freq * t)[:, None] * scale).astype("<i2")


def _crc8(data: bytes) -> int:  # FLAC frame header CRC: x^8 + x^2 + x + 1
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:  # FLAC frame CRC: x^16 + x^15 + x^2 + 1
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's frame number coding (UTF-8's scheme, here for n < 2^16)."""
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    return bytes([0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])


def silent_flac(seconds: float, rate: int, block: int = 65535) -> bytes:
    """Mono 16-bit FLAC of silence: STREAMINFO, then one frame per `block` samples, each frame a
    single CONSTANT subframe (value 0), so hours of audio take ~14 bytes per 65535 samples."""
    total = round(seconds * rate)
    info = bytearray(struct.pack(">HH", block, block) + b"\0" * 6)  # min/max block; frame sizes unknown
    packed = (rate << 44) | (0 << 41) | (15 << 36) | total  # rate 20 bits, channels-1 3, bps-1 5, samples 36
    info += packed.to_bytes(8, "big") + b"\0" * 16  # MD5 0: not computed
    out = bytearray(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)  # last metadata block
    for number, start in enumerate(range(0, total, block)):
        size = min(block, total - start)
        # sync 0xFFF8 (fixed blocksize); block-size code 7 (16-bit size-1 follows), rate code 0
        # (from STREAMINFO); channels 0 (mono), sample-size code 4 (16 bits).
        header = bytes([0xFF, 0xF8, 0x70, 0x08]) + _utf8_number(number) + struct.pack(">H", size - 1)
        header += bytes([_crc8(header)])
        frame = header + bytes([0x00]) + struct.pack(">h", 0)  # CONSTANT subframe, no wasted bits
        out += frame + struct.pack(">H", _crc16(frame))
    return bytes(out)


def files() -> dict[str, bytes]:
    rng = np.random.default_rng(18)
    return {
        "sample_rate_bomb.wav": wav(tone(2000 / 999983, 999983), 999983),
        "silence_3h.flac": silent_flac(3 * 3600, 8000),
        "truncated.wav": wav(tone(0.5, 16000), 16000, declared_bytes=20 * 16000 * 2),
        "channels_8.wav": wav(tone(0.1, 8000, channels=8), 8000),
        "channels_9.wav": wav(tone(0.1, 8000, channels=9), 8000),
        "rate_4hz.wav": wav(tone(4.0, 4, freq=1.0), 4),
        "garbage.bin": rng.bytes(4096),
        "playlist.m3u8": (
            b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
            b"#EXTINF:10.0,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n"
        ),
        "text.mp4": b"This is a text file, not a video: only its name ends in .mp4.\n" * 4,
    }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files().items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "hostile")
