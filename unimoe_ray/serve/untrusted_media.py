"""Client-sent audio and video bytes → numpy arrays, checked before they are decoded.

`read_audio_upload` / `read_video_upload` run the decoders below in a child process under a
memory cap and a timeout (serve/sandbox.py), so a hostile file fails only its own request; the
decoders themselves are plain functions (the tests call them directly). No torch, no Ray here:
the child imports this module.

Audio — libsndfile through soundfile. The header comes first (`sf.info`): a sample rate within
8-192 kHz, at most 8 channels, a duration within the cap, and a rate the codec's resampler
(julius, windowed sinc) turns into the codec's rate with a small filter: julius builds one filter
per output phase after dividing both rates by their gcd, so 999983 Hz → 16 kHz would need a 16000
x 1M filter (64 GB; the 4 KB upload that once took a replica to 19.7 GB) and even 191999 Hz
needs 12 GB. Then at most cap + 1 frames are decoded, so memory stays within cap·channels·4 bytes
whatever the header claims; a WAV whose data chunk claims more bytes than the file holds is
refused as truncated (libsndfile would quietly read what is there).

Video — PyAV (its own FFmpeg build) for every upload; decord stays for local, trusted files
(inference/video.load_video). Only mp4/mov and webm/mkv are accepted, recognised from their
first bytes, and opened with that demuxer forced: FFmpeg never sniffs the format, so an HLS
playlist, a DASH manifest or a concat list is never parsed, and the bytes are read from memory
with no protocol allowed, so no nested URL or file is ever opened. Frames are sampled and resized
as load_video does (FFmpeg's bilinear scale in YUV, then RGB, as decord's filter graph), which
gives bit-identical vision inputs (tests/unit/test_uploads.py).

Shape legend: N samples, C channels, T frames, H height, W width.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from unimoe_ray.media.video import frames_to_patches, sample_frame_indices, smart_resize
from unimoe_ray.serve.sandbox import run_isolated

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MAX_CHANNELS = 8
# julius' filter for a rate pair (entries); 16M float32 = 64 MB. Common rates need far less
# (44.1 kHz → 16 kHz: 93k entries); only rates that share no large factor with the target pass it.
MAX_RESAMPLE_TAPS = 16_000_000
AUDIO_TIMEOUT_S = 20.0

VIDEO_DEMUXERS = {"mp4": "mov", "matroska": "matroska"}  # sniffed kind → FFmpeg demuxer forced
MAX_VIDEO_SIDE = 4096  # pixels; the decoder's reference frames are bounded by it
MAX_UPLOAD_FRAMES = 32  # frames sampled from an upload when the sampling itself sets no limit
VIDEO_MEMORY_MB = 1024
VIDEO_TIMEOUT_S = 30.0
# ISO-BMFF / QuickTime files start with a box: 4 size bytes, then one of these types.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_EBML = b"\x1a\x45\xdf\xa3"  # Matroska / WebM


# ---- audio ----


@dataclass(frozen=True)
class AudioHeader:
    format: str  # libsndfile's major format ("WAV", "FLAC", "OGG", "MP3", ...)
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def resample_taps(rate_from: int, rate_to: int, *, zeros: int = 24, rolloff: float = 0.945) -> int:
    """Entries of the filter julius.resample_frac builds for this pair (its defaults): one
    kernel per output phase, new' x (old' + 2·ceil(zeros·old' / (min(old', new')·rolloff)))
    with old', new' the rates divided by their gcd; 0 when the rates are equal."""
    if rate_from == rate_to:
        return 0
    g = math.gcd(rate_from, rate_to)
    old, new = rate_from // g, rate_to // g
    width = math.ceil(zeros * old / (min(old, new) * rolloff))
    return new * (old + 2 * width)


def probe_audio(data: bytes, *, max_seconds: float, target_rate: int | None = None) -> AudioHeader:
    """Check an upload's header without decoding any sample.

    Args:
        max_seconds: the longest audio accepted (the header's frame count decides).
        target_rate: the rate the audio will be resampled to (the codec's); None skips the
            resampling-cost check.

    Raises:
        ValueError: unreadable, truncated, or outside a limit (the message names it).
    """
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as err:  # libsndfile's errors are not one class
        reason = getattr(err, "error_string", None) or "unrecognised data"
        raise ValueError(f"could not read the audio ({reason}): send wav, flac, ogg or mp3") from None
    head = AudioHeader(
        format=str(info.format), sample_rate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames)
    )
    if not MIN_SAMPLE_RATE <= head.sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"the audio's sample rate is {head.sample_rate} Hz: it must be within "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    if not 1 <= head.channels <= MAX_CHANNELS:
        raise ValueError(f"the audio has {head.channels} channels: at most {MAX_CHANNELS}")
    if (lie := _wav_truncation(data)) is not None:
        raise ValueError(
            f"the WAV file is truncated: its header declares {lie[0]} bytes of samples but the file "
            f"holds {lie[1]}; upload the complete file"
        )
    if head.seconds > max_seconds:
        raise ValueError(f"the audio is {head.seconds:.1f} s long: at most {max_seconds:g} s")
    if target_rate is not None and resample_taps(head.sample_rate, target_rate) > MAX_RESAMPLE_TAPS:
        g = math.gcd(head.sample_rate, target_rate)
        raise ValueError(
            f"the audio's sample rate {head.sample_rate} Hz does not resample to {target_rate} Hz with a small "
            f"filter (the ratio reduces only to {head.sample_rate // g}/{target_rate // g}): convert it to a "
            "common rate (16000, 22050, 24000, 32000, 44100 or 48000 Hz) first"
        )
    return head


def decode_audio(data: bytes, *, max_seconds: float, target_rate: int | None = None) -> dict:
    """probe_audio, then decode at most the cap: {"wav": float32 (N,) mono (channels averaged),
    "sample_rate": int}. Raises ValueError as probe_audio, and for audio longer than its header
    said or without samples."""
    head = probe_audio(data, max_seconds=max_seconds, target_rate=target_rate)
    cap = math.ceil(max_seconds * head.sample_rate)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            wav_NC = f.read(frames=cap + 1, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:
        reason = getattr(err, "error_string", None) or str(err)
        raise ValueError(f"could not decode the audio ({reason}): send wav, flac, ogg or mp3") from None
    if wav_NC.shape[0] > cap:
        raise ValueError(f"the audio is longer than its header says: at most {max_seconds:g} s")
    if wav_NC.shape[0] == 0:
        raise ValueError("the audio holds no samples")
    return {"wav": wav_NC.mean(axis=1, dtype=np.float32), "sample_rate": head.sample_rate}


def _wav_truncation(data: bytes) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF WAV's data chunk when it declares more than the file
    holds; None otherwise (and for the 0 / 0xFFFFFFFF sizes of streamed WAVs)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"data":
            present = len(data) - pos - 8
            return (size, present) if size not in (0, 0xFFFFFFFF) and size > present else None
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None


def audio_memory_mb(max_seconds: float) -> float:
    """The child's memory budget: the largest decode the limits allow (max_seconds at 192 kHz,
    8 channels, float32), half again for libsndfile's buffers and the mono mix, plus 128 MB."""
    return 128 + 1.5 * max_seconds * MAX_SAMPLE_RATE * MAX_CHANNELS * 4 / 2**20


def read_audio_upload(
    data: bytes, *, max_seconds: float, target_rate: int, timeout_s: float = AUDIO_TIMEOUT_S
) -> tuple[np.ndarray, int]:
    """decode_audio in a child process: (float32 (N,) mono, sample rate). ValueError for the client.
    The header checks run here first (libsndfile reads the header only, no sample is decoded):
    a file they refuse costs no child process (~130 ms of CPU each), so a flood of bad uploads
    takes little from the decode loop; the child runs them again before it decodes."""
    probe_audio(data, max_seconds=max_seconds, target_rate=target_rate)
    out = run_isolated(
        f"{__name__}:decode_audio",
        {"data": data, "max_seconds": max_seconds, "target_rate": target_rate},
        memory_mb=audio_memory_mb(max_seconds),
        timeout_s=timeout_s,
        what="the audio",
    )
    return out["wav"], int(out["sample_rate"])


# ---- video ----


@dataclass(frozen=True, kw_only=True)
class VideoPlan:
    """How an uploaded video is sampled and patched, as plain numbers (the child imports no torch):
    inference/video.VideoSampling and the vision tower's patch layout."""

    fps: float
    max_frames: int
    min_pixels: int
    max_pixels: tuple[int, ...]  # [n - 1]: the frame-area cap when n frames are sampled
    patch_size: int
    temporal_patch_size: int
    merge_size: int

    @classmethod
    def of(cls, vision, sampling) -> "VideoPlan":
        """From a VisionConfig and a VideoSampling; a sampling without max_frames takes at most
        MAX_UPLOAD_FRAMES frames from an upload."""
        n = min(sampling.max_frames or MAX_UPLOAD_FRAMES, MAX_UPLOAD_FRAMES)
        return cls(
            fps=sampling.fps,
            max_frames=n,
            min_pixels=sampling.min_pixels,
            max_pixels=tuple(sampling.max_pixels(k) for k in range(1, n + 1)),
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )


def sniff_container(data: bytes) -> str:
    """ "mp4" (mp4/mov) or "matroska" (webm/mkv) from the first bytes; ValueError otherwise."""
    if data[4:8] in _MP4_BOXES:
        return "mp4"
    if data[:4] == _EBML:
        return "matroska"
    text = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"#EXTM3U") or b"#EXT-X-" in text or b"#EXTINF" in text:
        raise ValueError(
            "the video is an HLS playlist (m3u8), not a video file: upload the video itself "
            "(mp4/mov, webm or mkv); the server opens no URL a client sends"
        )
    raise ValueError("the video is not an mp4/mov, webm or mkv file (its first bytes match none of them)")


def decode_video(data: bytes, *, plan: VideoPlan) -> dict:
    """An uploaded video → {"pixel_values": float32 (N, 3·t·p·p), "grid_thw": int64 (3,)}, as
    inference/video.load_video builds them from a file. Raises ValueError naming the cause."""
    import av  # lazy: only video needs it

    demuxer = VIDEO_DEMUXERS[sniff_container(data)]
    try:
        # A forced demuxer (no probing) over an in-memory file; no protocol is named "none", so
        # any nested open a demuxer might try (an HLS segment, a mov data reference) is refused.
        container = av.open(io.BytesIO(data), mode="r", format=demuxer, options={"protocol_whitelist": "none"})
    except av.FFmpegError as err:
        raise ValueError(f"could not open the video ({_av_reason(err)}): send an mp4/mov, webm or mkv file") from None
    with container:
        if not container.streams.video:
            raise ValueError("the video file holds no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # bounded memory, and frames independent of the machine
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_frame_size(width, height)
        video_fps = float(stream.average_rate or stream.guessed_rate or 0)
        if not 0 < video_fps <= 1000:
            raise ValueError(f"the video's frame rate ({video_fps:g} fps) is unusable: re-encode it")
        if stream.frames > 0:
            total = int(stream.frames)
        else:  # webm / mkv carry no frame count: from the duration, as FFmpeg-based readers do
            seconds = (
                float(stream.duration * stream.time_base)
                if stream.duration is not None
                else (container.duration or 0) / 1e6
            )
            total = max(1, round(seconds * video_fps))
        # Only the window the sampled frames can fall in: a header claiming 10^9 frames would
        # otherwise make the index array itself the bomb.
        end_s = min(total / video_fps, (plan.max_frames + 1) * max(1 / plan.fps, 1 / video_fps))
        idx_T = sample_frame_indices(total, video_fps, plan.fps, 0.0, end_s)[: plan.max_frames]
        if idx_T.size == 0:
            raise ValueError("the video has no frames to sample")
        wanted, frames_THWC, graph = set(idx_T.tolist()), [], None
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i > idx_T[-1]:
                    break
                if i not in wanted:
                    continue
                if graph is None:
                    _check_frame_size(frame.width, frame.height)
                    new_h, new_w = smart_resize(
                        frame.height,
                        frame.width,
                        plan.patch_size * plan.merge_size,
                        min_pixels=plan.min_pixels,
                        max_pixels=plan.max_pixels[idx_T.size - 1],
                    )
                    graph = _scaler(av, frame, new_w, new_h)
                graph.push(frame)
                frames_THWC.append(graph.pull().to_ndarray())
        except av.FFmpegError as err:
            raise ValueError(f"could not decode the video ({_av_reason(err)})") from None
    if not frames_THWC:
        raise ValueError("the video holds no decodable frames")
    pixel_values, grid_thw = frames_to_patches(
        np.stack(frames_THWC),
        patch_size=plan.patch_size,
        temporal_patch_size=plan.temporal_patch_size,
        merge_size=plan.merge_size,
    )
    return {"pixel_values": pixel_values, "grid_thw": grid_thw}


def _check_frame_size(width: int, height: int) -> None:
    if not (0 < width <= MAX_VIDEO_SIDE and 0 < height <= MAX_VIDEO_SIDE):
        raise ValueError(f"the video's frames are {width}x{height}: at most {MAX_VIDEO_SIDE} pixels a side")


def _scaler(av, frame, width: int, height: int):
    """decord's conversion: FFmpeg's `scale` filter (bilinear) in the decoded pixel format,
    then `format=rgb24` (converting first, or PyAV's own reformat, gives other pixels)."""
    graph = av.filter.Graph()
    src = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name, time_base=frame.time_base)
    chain = [
        src,
        graph.add("scale", f"{width}:{height}:flags=bilinear"),
        graph.add("format", "rgb24"),
        graph.add("buffersink"),
    ]
    for a, b in zip(chain, chain[1:]):
        a.link_to(b)
    graph.configure()
    return graph


def _av_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or type(err).__name__


def read_video_upload(
    data: bytes, plan: VideoPlan, *, timeout_s: float = VIDEO_TIMEOUT_S
) -> tuple[np.ndarray, np.ndarray]:
    """decode_video in a child process: (pixel_values, grid_thw). ValueError for the client.
    The container is recognised by its first bytes here first: a playlist or a non-video costs
    no child process."""
    sniff_container(data)
    out = run_isolated(
        f"{__name__}:decode_video",
        {"data": data, "plan": plan},
        memory_mb=VIDEO_MEMORY_MB,
        timeout_s=timeout_s,
        what="the video",
        imports=("av",),
    )
    return out["pixel_values"], out["grid_thw"]
