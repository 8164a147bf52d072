"""A small generated corpus for the four tasks, so the whole pipeline runs anywhere.

- tts_en / tts_zh: sentences from a seeded grammar, spoken by espeak-ng (`-v en-*` / `-v cmn`)
  with a few fixed speakers (voice variant + pitch); the transcript is the text spoken.
- t2m: pieces from `music.py`; the caption states tempo, instrument, key/mode, mood, drums.
- v2m: a piece plus a video of a ball that circles once per bar (4 beats) and swells on each
  beat, coloured by mood and instrument, so the video carries the music's tempo. One turn per
  bar, not per beat, because the pipeline samples video at 1-2 fps: a beat-rate motion
  (1-2.5 Hz) would alias away, a bar-rate one (0.25-0.6 Hz) survives.
- broken rows, each tagged in the manifest with the outcome the pipeline must give
  (`expect`): corrupt, empty, silent, too short or missing audio, missing or corrupt video,
  text that normalises to nothing, a duplicate row; and two low-quality clips the quality
  filters must drop (speech under loud noise, clipped music).

Audio comes at several sample rates, some stereo, to exercise decoding and resampling. The
same seed gives byte-identical files (per-item RNG streams, bit-exact ffmpeg settings).
No Ray in this module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from unimoe_ray.data import music

_EN_SPEAKERS = (("en-us", "+m3", 50), ("en-us", "+f2", 60), ("en-gb", "+m1", 40), ("en-gb", "+f4", 55))
_ZH_SPEAKERS = (("cmn", "+m3", 45), ("cmn", "+f2", 60), ("cmn", "+m1", 35), ("cmn", "+f4", 55))
_EN = {
    "det": ("The", "A", "My", "Our", "That"),
    "adj": ("quiet", "bright", "small", "happy", "old", "young", "clever", "tired"),
    "noun": ("dog", "teacher", "river", "child", "musician", "garden", "train", "painter"),
    "verb": ("walks", "sings", "waits", "plays", "rests", "listens", "dances", "reads"),
    "place": (
        "by the lake",
        "in the morning",
        "near the station",
        "after dinner",
        "under the bridge",
        "at the market",
        "on the hill",
        "before sunrise",
    ),
}
_ZH = {
    "time": ("今天", "明天", "早上", "晚上", "周末", "下午"),
    "subj": ("我", "你", "他", "老师", "小朋友", "妈妈", "我们"),
    "adv": ("很", "也", "常常", "一起", "慢慢地"),
    "verb": ("喜欢听", "想看", "在学", "去买", "在唱"),
    "obj": ("音乐", "电影", "中文", "水果", "一首歌", "新书"),
}
_MOOD_COLOURS = {"major": (240, 190, 110), "minor": (50, 70, 130)}
_INSTRUMENT_COLOURS = {
    "flute": (255, 255, 255),
    "clarinet": (30, 30, 30),
    "strings": (200, 40, 40),
    "guitar": (40, 160, 60),
    "marimba": (230, 200, 40),
}
_MUSIC_FORMATS = ((16000, 1), (22050, 1), (44100, 2))  # (sample rate, channels), by turn


@dataclass(frozen=True, kw_only=True)
class MiniCorpusConfig:
    """Rows per task (imbalanced like real data: video is scarce) and sizes."""

    n_tts_en: int = 20
    n_tts_zh: int = 16
    n_t2m: int = 16
    n_v2m: int = 8
    music_seconds: tuple[float, float] = (6.0, 12.0)
    video_seconds: tuple[float, float] = (4.0, 8.0)
    # One piece this long, so music segmentation into windows has work to do.
    long_music_seconds: float = 45.0
    video_size: int = 112
    video_fps: int = 8
    broken: bool = True
    seed: int = 0


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent stream per item: adding rows to one task never changes another's files."""
    return np.random.default_rng([seed, *stream])


def english_sentence(rng: np.random.Generator) -> str:
    pick = {k: v[rng.integers(len(v))] for k, v in _EN.items()}
    det = "An" if pick["det"] == "A" and pick["adj"][0] in "aeiou" else pick["det"]
    return f"{det} {pick['adj']} {pick['noun']} {pick['verb']} {pick['place']}."


def mandarin_sentence(rng: np.random.Generator) -> str:
    pick = {k: v[rng.integers(len(v))] for k, v in _ZH.items()}
    return f"{pick['time']}{pick['subj']}{pick['adv']}{pick['verb']}{pick['obj']}。"


def speak(text: str, path: Path, voice: str, variant: str, pitch: int, speed: int) -> None:
    """espeak-ng -> 22.05 kHz mono 16-bit WAV at `path`."""
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed: apt-get install -y espeak-ng")
    subprocess.run(
        ["espeak-ng", "-v", voice + variant, "-p", str(pitch), "-s", str(speed), "-w", str(path), text],
        check=True,
        capture_output=True,
    )


def ball_video_frames(piece: music.Piece, duration_s: float, size: int, fps: int) -> np.ndarray:
    """uint8 (T, size, size, 3): a ball orbiting once per bar, swelling on every beat."""
    _, mode = music.estimate_key(piece.melody + piece.bass)
    t_T = np.arange(int(round(duration_s * fps))) / fps
    beats_T = t_T * piece.bpm / 60.0
    angle_T = 2 * np.pi * beats_T / 4.0  # one turn per 4-beat bar
    radius_T = size * (0.10 + 0.05 * np.exp(-4.0 * (beats_T % 1.0)))  # swell decays each beat
    cx_T = size / 2 + 0.3 * size * np.cos(angle_T)
    cy_T = size / 2 + 0.3 * size * np.sin(angle_T)
    yy, xx = np.mgrid[0:size, 0:size]
    inside_THW = (yy - cy_T[:, None, None]) ** 2 + (xx - cx_T[:, None, None]) ** 2 <= radius_T[:, None, None] ** 2
    frames = np.empty((len(t_T), size, size, 3), np.uint8)
    frames[:] = _MOOD_COLOURS[mode]
    frames[inside_THW] = _INSTRUMENT_COLOURS[piece.instrument]
    return frames


def write_mp4(path: Path, frames_THWC: np.ndarray, fps: int) -> None:
    """H.264 mp4 through an ffmpeg pipe; bit-exact flags and one thread so bytes repeat."""
    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("ffmpeg is not installed: apt-get install -y ffmpeg")
    _, height, width, _ = frames_THWC.shape
    cmd = [
        "ffmpeg",
        "-v",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{width}x{height}",
        "-r",
        str(fps),
        "-i",
        "-",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-threads",
        "1",
        "-fflags",
        "+bitexact",
        "-flags:v",
        "+bitexact",
        "-map_metadata",
        "-1",
        str(path),
    ]
    subprocess.run(cmd, input=np.ascontiguousarray(frames_THWC).tobytes(), check=True, capture_output=True)


def _write_music(path: Path, wav: np.ndarray, sr: int, channels: int) -> None:
    if channels == 2:  # right channel a touch quieter, so the mono mix is a real mix
        wav = np.stack([wav, 0.9 * wav], axis=1)
    sf.write(path, wav, sr, subtype="PCM_16")


def _piece(rng: np.random.Generator, seconds: float) -> music.Piece:
    bpm = int(rng.integers(70, 151))
    return music.compose(
        rng,
        tonic=int(rng.integers(12)),
        mode=("major", "minor")[rng.integers(2)],
        bpm=bpm,
        n_bars=max(2, round(seconds * bpm / 240)),
        instrument=list(music.INSTRUMENTS)[rng.integers(len(music.INSTRUMENTS))],
        drums=bool(rng.integers(2)),
    )


# The corpus speaks its speech with espeak-ng and encodes its videos with ffmpeg.
TOOLS = ("espeak-ng", "ffmpeg")  # scripts/setup_venv.sh installs both


def check_tools() -> None:
    """Raise FileNotFoundError naming the missing tools and the command that installs them."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(
            f"{' and '.join(missing)} not found on PATH: the mini corpus speaks its speech with "
            "espeak-ng and encodes its videos with ffmpeg. Install them with "
            "`apt-get install -y espeak-ng ffmpeg` (scripts/setup_venv.sh does this when run as "
            "root)"
        )


def make_mini_corpus(out_dir: str | Path, cfg: MiniCorpusConfig = MiniCorpusConfig()) -> Path:
    """Write the corpus under out_dir and return its manifest (manifest.jsonl; audio/video
    paths relative to it). Rows: task, audio, text, video, speaker, language, and for
    deliberately bad rows `expect` = "quarantined:<reason>" or "filtered:<reason>"."""
    check_tools()  # before writing anything: no half-made corpus
    out = Path(out_dir)
    for sub in ("speech", "music", "video", "broken"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    for lang, task, n, speakers, sentence, stream in (
        ("en", "tts_en", cfg.n_tts_en, _EN_SPEAKERS, english_sentence, 1),
        ("zh", "tts_zh", cfg.n_tts_zh, _ZH_SPEAKERS, mandarin_sentence, 2),
    ):
        for i in range(n):
            rng = _rng(cfg.seed, stream, i)
            voice, variant, pitch = speakers[rng.integers(len(speakers))]
            text = sentence(rng)
            rel = f"speech/{lang}_{i:04d}.wav"
            speak(text, out / rel, voice, variant, pitch, int(rng.integers(145, 181)))
            rows.append(dict(task=task, audio=rel, text=text, speaker=f"{voice}{variant}", language=lang))

    for i in range(cfg.n_t2m):
        rng = _rng(cfg.seed, 3, i)
        seconds = cfg.long_music_seconds if i == 0 and cfg.long_music_seconds else rng.uniform(*cfg.music_seconds)
        piece = _piece(rng, seconds)
        sr, channels = _MUSIC_FORMATS[i % len(_MUSIC_FORMATS)]
        rel = f"music/t2m_{i:04d}.wav"
        _write_music(out / rel, music.render(piece, sr, rng), sr, channels)
        rows.append(dict(task="t2m", audio=rel, text=music.caption(piece, rng)))

    for i in range(cfg.n_v2m):
        rng = _rng(cfg.seed, 4, i)
        piece = _piece(rng, rng.uniform(*cfg.video_seconds))
        rel, rel_video = f"music/v2m_{i:04d}.wav", f"video/v2m_{i:04d}.mp4"
        _write_music(out / rel, music.render(piece, 22050, rng), 22050, 1)
        write_mp4(
            out / rel_video, ball_video_frames(piece, piece.duration_s, cfg.video_size, cfg.video_fps), cfg.video_fps
        )
        rows.append(dict(task="v2m", audio=rel, video=rel_video, text=music.caption(piece, rng)))

    if cfg.broken:
        rows += _broken_rows(out, cfg, rows)
    manifest = out / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return manifest


def manifest_counts(manifest: str | Path) -> tuple[dict[str, int], int]:
    """Rows per task of a mini-corpus manifest, and how many of them are the deliberately broken
    ones (those with an `expect`)."""
    rows = [json.loads(line) for line in Path(manifest).read_text(encoding="utf-8").splitlines()]
    return dict(Counter(r["task"] for r in rows)), sum("expect" in r for r in rows)


def write_test_assets(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """What the corpus is preprocessed with when no real weights are at hand: a test BPE
    tokenizer (out_dir/tokenizer) and a random-weight DAC (out_dir/dac_random.pth, from `seed`).
    Returns (tokenizer folder, DAC file)."""
    # Imported here: the corpus itself needs neither torch nor the tokenizer libraries.
    from unimoe_ray.audio.codec import DACCodec
    from unimoe_ray.text.tokenizer import build_test_tokenizer

    out = Path(out_dir)
    return build_test_tokenizer(out / "tokenizer"), DACCodec.random(seed=seed).save(out / "dac_random.pth")


def _broken_rows(out: Path, cfg: MiniCorpusConfig, good_rows: list[dict]) -> list[dict]:
    """One row per failure the pipeline must survive, each tagged with the expected outcome."""
    rng = _rng(cfg.seed, 5)
    b = out / "broken"
    (b / "corrupt.wav").write_bytes(b"RIFF" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (b / "empty.wav").write_bytes(b"")
    sf.write(b / "silence.wav", np.zeros(3 * 16000, np.float32), 16000, subtype="PCM_16")
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(0.3 * 16000)) / 16000)
    sf.write(b / "short.wav", tone, 16000, subtype="PCM_16")
    (b / "corrupt.mp4").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())

    text = english_sentence(rng)
    speak(text, b / "noisy_speech.wav", "en-us", "+m3", 50, 160)
    speech, sr = sf.read(b / "noisy_speech.wav", dtype="float32")
    noise = rng.normal(0.0, np.sqrt(np.mean(speech**2)), speech.shape)  # 0 dB SNR
    sf.write(b / "noisy_speech.wav", np.clip(0.5 * (speech + noise), -1, 1), sr, subtype="PCM_16")
    speak(english_sentence(rng), b / "blank_text.wav", "en-us", "+f2", 60, 160)

    piece = _piece(rng, 6.0)
    clipped_caption = music.caption(piece, rng)
    sf.write(b / "clipped_music.wav", np.clip(8.0 * music.render(piece, 16000, rng), -1, 1), 16000, subtype="PCM_16")
    for name in ("v2m_music_a.wav", "v2m_music_b.wav"):  # two rows, two sample ids
        sf.write(b / name, music.render(_piece(rng, 4.0), 16000, rng), 16000, subtype="PCM_16")
    first_tts = next(r for r in good_rows if r["task"] == "tts_en")

    def q(reason: str) -> str:
        return f"quarantined:{reason}"

    return [
        dict(task="tts_en", audio="broken/corrupt.wav", text="Corrupt bytes.", expect=q("corrupt_audio")),
        dict(task="tts_en", audio="broken/empty.wav", text="An empty file.", expect=q("empty_file")),
        dict(task="t2m", audio="broken/silence.wav", text="Silence.", expect=q("silent")),
        dict(task="tts_zh", audio="broken/short.wav", text="太短了。", expect=q("too_short")),
        dict(task="tts_zh", audio="broken/does_not_exist.wav", text="没有文件。", expect=q("missing_audio")),
        dict(
            task="v2m",
            audio="broken/v2m_music_a.wav",
            video="video/does_not_exist.mp4",
            text="Music for a missing video.",
            expect=q("missing_video"),
        ),
        dict(
            task="v2m",
            audio="broken/v2m_music_b.wav",
            video="broken/corrupt.mp4",
            text="Music for a corrupt video.",
            expect=q("corrupt_video"),
        ),
        # Zero-width spaces and a tab: nothing left once text is normalised.
        dict(task="tts_en", audio="broken/blank_text.wav", text="\u200b\u200b \t\u200b", expect=q("empty_text")),
        dict(first_tts, expect=q("duplicate")),
        dict(task="tts_en", audio="broken/noisy_speech.wav", text=text, expect="filtered:low_snr_db"),
        dict(task="t2m", audio="broken/clipped_music.wav", text=clipped_caption, expect="filtered:high_clipping_ratio"),
    ]
