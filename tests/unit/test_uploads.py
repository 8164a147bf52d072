"""Untrusted uploads: bodies read under a cap (serve/uploads), audio and video checked and decoded
in a child process under limits (serve/untrusted_media, serve/sandbox), every file in
tests/data/hostile refused with its own message. No Ray."""

import asyncio
import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from starlette.requests import Request

from unimoe_ray.data.mini_corpus import write_mp4
from unimoe_ray.inference.video import VideoSampling, load_video
from unimoe_ray.presets import get_preset
from unimoe_ray.serve.sandbox import run_isolated
from unimoe_ray.serve.untrusted_media import (
    VideoPlan,
    decode_audio,
    decode_video,
    probe_audio,
    read_audio_upload,
    read_video_upload,
    resample_taps,
)
from unimoe_ray.serve.uploads import UploadError, json_body_limit, read_body, read_form
from unimoe_ray.serve.voices import VoiceStore, VoiceStoreError

HOSTILE = Path(__file__).parents[1] / "data" / "hostile"
SCRIPT = Path(__file__).parents[1] / "data" / "make_hostile_files.py"


def _hostile(name: str) -> bytes:
    return (HOSTILE / name).read_bytes()


def _wav(samples_NC: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples_NC, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ---- the hostile files ----


def test_the_script_regenerates_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True)
    made = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in HOSTILE.iterdir()}
    assert made.keys() == committed.keys() and len(made) == 9
    assert [n for n in made if made[n] != committed[n]] == []
    assert sum(map(len, made.values())) < 200_000


def test_the_hostile_files_are_what_they_claim():
    """The headers say what the file names promise (so each refusal below is for that cause)."""
    bomb = sf.info(io.BytesIO(_hostile("sample_rate_bomb.wav")))
    assert (bomb.samplerate, bomb.frames) == (999983, 2000) and len(_hostile("sample_rate_bomb.wav")) == 4044
    flac = sf.info(io.BytesIO(_hostile("silence_3h.flac")))
    assert (flac.samplerate, flac.frames, flac.format) == (8000, 3 * 3600 * 8000, "FLAC")
    assert len(_hostile("silence_3h.flac")) < 20_000
    with sf.SoundFile(io.BytesIO(_hostile("silence_3h.flac"))) as f:  # real silence, to the end
        f.seek(flac.frames - 1000)
        assert not f.read(dtype="int16").any()
    data = _hostile("truncated.wav")
    assert struct.unpack("<I", data[40:44])[0] == 20 * 16000 * 2 and len(data) - 44 == 16000
    assert sf.info(io.BytesIO(_hostile("channels_9.wav"))).channels == 9
    assert sf.info(io.BytesIO(_hostile("rate_4hz.wav"))).samplerate == 4
    assert b"http://127.0.0.1:9/x.ts" in _hostile("playlist.m3u8")


AUDIO_REFUSALS = [
    ("sample_rate_bomb.wav", r"sample rate is 999983 Hz: it must be within 8000-192000 Hz"),
    ("silence_3h.flac", r"the audio is 10800\.0 s long: at most 30 s"),
    ("truncated.wav", r"truncated: its header declares 640000 bytes of samples but the file holds 16000"),
    ("channels_9.wav", r"the audio has 9 channels: at most 8"),
    ("rate_4hz.wav", r"sample rate is 4 Hz: it must be within 8000-192000 Hz"),
    ("garbage.bin", r"could not read the audio \(Format not recognised\.\): send wav, flac, ogg or mp3"),
    ("playlist.m3u8", r"could not read the audio"),
    ("text.mp4", r"could not read the audio"),
]


@pytest.mark.parametrize("name,message", AUDIO_REFUSALS)
def test_hostile_audio_is_refused_from_its_header(name, message):
    with pytest.raises(ValueError, match=message):
        probe_audio(_hostile(name), max_seconds=30, target_rate=16000)
    with pytest.raises(ValueError, match=message):
        decode_audio(_hostile(name), max_seconds=30, target_rate=16000)


def test_eight_channels_are_accepted_and_averaged_to_mono():
    data = _hostile("channels_8.wav")
    out = decode_audio(data, max_seconds=30, target_rate=16000)
    samples_NC = np.frombuffer(data[44:], dtype="<i2").reshape(-1, 8)
    expected_N = (samples_NC.astype(np.float32) / 32768).mean(axis=1, dtype=np.float32)
    assert out["sample_rate"] == 8000 and out["wav"].dtype == np.float32
    np.testing.assert_allclose(out["wav"], expected_N, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "name,message",
    [
        ("playlist.m3u8", r"the video is an HLS playlist \(m3u8\), not a video file"),
        ("text.mp4", r"the video is not an mp4/mov, webm or mkv file"),
        ("garbage.bin", r"the video is not an mp4/mov, webm or mkv file"),
        ("sample_rate_bomb.wav", r"the video is not an mp4/mov, webm or mkv file"),
    ],
)
def test_hostile_videos_are_refused_before_ffmpeg_sees_them(name, message):
    plan = VideoPlan.of(get_preset("tiny").vision, VideoSampling())
    with pytest.raises(ValueError, match=message):
        decode_video(_hostile(name), plan=plan)


def test_a_fake_mp4_box_then_junk_fails_in_the_demuxer_with_a_clear_error():
    plan = VideoPlan.of(get_preset("tiny").vision, VideoSampling())
    junk = struct.pack(">I", 24) + b"ftypisom" + b"\0" * 12 + bytes(range(256)) * 8
    with pytest.raises(ValueError, match=r"could not (open|decode) the video|holds no video stream"):
        decode_video(junk, plan=plan)


# ---- audio limits ----


def test_duration_cap_and_frame_cap():
    two_s = _wav(np.zeros((32000, 1), np.float32), 16000)
    with pytest.raises(ValueError, match=r"the audio is 2\.0 s long: at most 1 s"):
        decode_audio(two_s, max_seconds=1, target_rate=16000)
    out = decode_audio(two_s, max_seconds=2, target_rate=16000)
    assert out["wav"].shape == (32000,)
    with pytest.raises(ValueError, match="holds no samples"):
        decode_audio(_wav(np.zeros((0, 1), np.float32), 16000), max_seconds=2)


def test_rates_whose_resampling_filter_is_huge_are_refused():
    # julius' filter: 44.1 kHz → 16 kHz reduces to 441/160 (93k taps); 191999 Hz shares nothing
    # with 16000 (3.1G taps, 12 GB): within 8-192 kHz, yet a bomb.
    assert resample_taps(44100, 16000) == 160 * (441 + 2 * 70)
    assert resample_taps(16000, 16000) == 0
    odd = _wav(np.zeros((1000, 1), np.float32), 191999)
    with pytest.raises(ValueError, match=r"191999 Hz does not resample to 16000 Hz .* 191999/16000"):
        probe_audio(odd, max_seconds=30, target_rate=16000)
    assert probe_audio(odd, max_seconds=30).sample_rate == 191999  # no target rate: no such check
    for rate in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000, 192000):
        probe_audio(_wav(np.zeros((100, 1), np.float32), rate), max_seconds=30, target_rate=16000)


# ---- the child process ----


def test_the_child_decodes_what_the_function_decodes_and_carries_its_refusals():
    data = _hostile("channels_8.wav")
    wav, rate = read_audio_upload(data, max_seconds=30, target_rate=16000)
    np.testing.assert_array_equal(wav, decode_audio(data, max_seconds=30)["wav"])
    assert rate == 8000
    with pytest.raises(ValueError, match="sample rate is 999983 Hz"):
        read_audio_upload(_hostile("sample_rate_bomb.wav"), max_seconds=30, target_rate=16000)


def test_a_decode_past_the_memory_cap_fails_in_the_child_not_here():
    # 10 s of 8-channel 48 kHz audio: 15 MB as float32, under an 8 MB cap on top of the child's imports.
    big = _wav(np.zeros((480_000, 8), np.float32), 48000)
    with pytest.raises(ValueError, match=r"decoding the audio needs more than 8 MB of memory: refused"):
        run_isolated(
            "unimoe_ray.serve.untrusted_media:decode_audio",
            {"data": big, "max_seconds": 30, "target_rate": 16000},
            memory_mb=8,
            timeout_s=60,
            what="the audio",
        )
    out = run_isolated(
        "unimoe_ray.serve.untrusted_media:decode_audio",
        {"data": big, "max_seconds": 30, "target_rate": 16000},
        memory_mb=256,
        timeout_s=60,
        what="the audio",
    )
    assert out["wav"].shape == (480_000,) and out["sample_rate"] == 48000


def test_a_child_past_its_timeout_is_killed():
    with pytest.raises(ValueError, match=r"the file took longer than 1 s to decode: stopped"):
        run_isolated("subprocess:run", {"args": ["sleep", "60"]}, memory_mb=64, timeout_s=1, what="the file")


def test_children_at_once_are_bounded(monkeypatch):
    from unimoe_ray.serve import sandbox

    busy = sandbox.threading.BoundedSemaphore(1)
    busy.acquire()  # every place taken
    monkeypatch.setattr(sandbox, "_CHILDREN", busy)
    with pytest.raises(TimeoutError, match=r"decoding 4 other uploads and could not start on the file within 0\.1 s"):
        run_isolated("os:getpid", {}, memory_mb=64, timeout_s=0.1, what="the file")


def test_a_crashing_decoder_is_a_clear_error():
    with pytest.raises(ValueError, match=r"could not decode the file: the decoder crashed \(signal 6\)"):
        run_isolated("os:abort", {}, memory_mb=64, timeout_s=30, what="the file")


# ---- video: PyAV for uploads gives load_video's (decord's) vision inputs ----


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The same 3 s of 2 fps video as mp4 (H.264), mkv (the same stream remuxed) and webm (VP9)."""
    tmp = tmp_path_factory.mktemp("clips")
    y_HW, x_HW = np.mgrid[0:64, 0:96]
    frames_THWC = np.stack(
        [np.stack([(x_HW * 2 + 10 * t) % 256, (y_HW * 3) % 256, ((x_HW + y_HW) * 2) % 256], -1) for t in range(6)]
    ).astype(np.uint8)
    write_mp4(tmp / "clip.mp4", frames_THWC, fps=2)
    run = dict(check=True, capture_output=True)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(tmp / "clip.mp4"), "-c", "copy", str(tmp / "clip.mkv")], **run
    )
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-i",
            str(tmp / "clip.mp4"),
            "-c:v",
            "libvpx-vp9",
            "-threads",
            "1",
            str(tmp / "clip.webm"),
        ],
        **run,
    )
    return {ext: tmp / f"clip.{ext}" for ext in ("mp4", "mkv", "webm")}


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
@pytest.mark.parametrize(
    "sampling",
    [VideoSampling(), VideoSampling(fps=2.0, max_frames=None), VideoSampling(fps=1.0, max_frames=3)],
    ids=["released", "all-2fps", "3-at-1fps"],
)
def test_pyav_upload_path_equals_decord_load_video(clips, ext, sampling):
    """Bit for bit: both scale with FFmpeg's bilinear filter in YUV, then convert to RGB."""
    vision = get_preset("tiny").vision
    want_pixels, want_grid = load_video(clips[ext], vision, sampling)
    got = decode_video(clips[ext].read_bytes(), plan=VideoPlan.of(vision, sampling))
    assert got["grid_thw"].tolist() == want_grid.tolist()
    assert torch.equal(torch.from_numpy(got["pixel_values"]), want_pixels)


def test_the_video_child_returns_the_same_inputs(clips):
    vision = get_preset("tiny").vision
    plan = VideoPlan.of(vision, VideoSampling())
    pixels, grid = read_video_upload(clips["mp4"].read_bytes(), plan)
    want = decode_video(clips["mp4"].read_bytes(), plan=plan)
    np.testing.assert_array_equal(pixels, want["pixel_values"])
    assert grid.tolist() == [1, 4, 6]
    with pytest.raises(ValueError, match="HLS playlist"):
        read_video_upload(_hostile("playlist.m3u8"), plan)


# ---- bodies under a cap ----


class _Client:
    """An ASGI receive that sends `chunks` (then, if endless, more of the last chunk forever)
    and counts how many messages the server pulled."""

    def __init__(self, chunks: list[bytes], *, endless: bool = False) -> None:
        self.chunks, self.endless, self.pulled = chunks, endless, 0

    async def receive(self) -> dict:
        i = self.pulled
        self.pulled += 1
        if i < len(self.chunks) - 1 or self.endless:
            return {"type": "http.request", "body": self.chunks[min(i, len(self.chunks) - 1)], "more_body": True}
        return {"type": "http.request", "body": self.chunks[-1] if self.chunks else b"", "more_body": False}


def _request(client: _Client, content_type: str, content_length: int | None = None) -> Request:
    headers = [(b"content-type", content_type.encode())]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, client.receive)


def _run(coro):
    return asyncio.run(coro)


def test_json_body_within_the_cap_is_returned_whole():
    client = _Client([b'{"input": ', b'"hello"}'])
    assert _run(read_body(_request(client, "application/json"), limit=100)) == b'{"input": "hello"}'


def test_json_body_past_the_cap_is_a_413_without_reading_the_rest():
    client = _Client([b"x" * 100], endless=True)
    with pytest.raises(UploadError, match=r"the request body is over 0\.00 MB: at most 0\.00 MB \(hint\)") as err:
        _run(read_body(_request(client, "application/json"), limit=1000, hint=" (hint)"))
    assert (err.value.status, err.value.code) == (413, "file_too_large")
    assert client.pulled == 11  # the chunk that crossed 1000 bytes, not one more


def test_a_declared_content_length_over_the_cap_is_refused_before_reading():
    client = _Client([b"x" * 100], endless=True)
    with pytest.raises(UploadError, match=r"the request body is 9\.54 MB: at most 0\.00 MB") as err:
        _run(read_body(_request(client, "application/json", content_length=10_000_000), limit=1000))
    assert err.value.status == 413 and client.pulled == 0


def test_json_limit_leaves_room_for_a_base64_file_and_two_texts():
    assert json_body_limit(file_bytes=3000, text_chars=100) == 4000 + 1200 + 16 * 1024


BOUNDARY = "XyZ123"


def _part(name: str, value: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def _multipart(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _chunks(body: bytes, size: int = 256) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def _form(body: bytes, **kw):
    client = _Client(_chunks(body))
    kw = {"files": {"audio_sample": 4000}, "field_bytes": 100, **kw}
    return _run(read_form(_request(client, f"multipart/form-data; boundary={BOUNDARY}"), **kw)), client


def test_multipart_fields_and_file_are_parsed_in_memory():
    audio = bytes(range(256)) * 10  # 2560 bytes, CR/LF and dashes included
    form, _ = _form(
        _multipart(
            _part("name", "narrator é".encode()),
            _part("ref_text", b"Hello."),
            _part("audio_sample", audio, "me.wav", "audio/wav"),
        )
    )
    assert form.fields == {"name": "narrator é", "ref_text": "Hello."}
    f = form.files["audio_sample"]
    assert (f.filename, f.content_type, f.data) == ("me.wav", "audio/wav", audio)


def test_a_file_part_past_its_cap_is_a_413_naming_it_without_reading_the_rest():
    head = (
        _part("name", b"x")
        + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="audio_sample"; filename="a.wav"\r\n\r\n'.encode()
    )
    client = _Client(_chunks(head, 256) + [b"\0" * 256], endless=True)  # a file that never ends
    request = _request(client, f"multipart/form-data; boundary={BOUNDARY}")
    with pytest.raises(UploadError, match=r"audio_sample is over 0\.00 MB") as err:
        _run(read_form(request, files={"audio_sample": 4000}, field_bytes=100))
    assert (err.value.status, err.value.param, err.value.code) == (413, "audio_sample", "file_too_large")
    # The headers' chunk, then 16 file chunks: the 16th takes the part to 4096 > 4000 bytes; no more read.
    assert client.pulled == len(_chunks(head, 256)) + 16


@pytest.mark.parametrize(
    "parts,status,message,param",
    [
        (
            [_part("video", b"v", "v.mp4")],
            400,
            r"unexpected file field 'video': only \['audio_sample'\] may be files",
            "video",
        ),
        ([_part("audio_sample", b"not a file")], 400, r"audio_sample must be an uploaded file", "audio_sample"),
        (
            [_part("audio_sample", b"a", "a.wav"), _part("audio_sample", b"b", "b.wav")],
            400,
            r"given twice",
            "audio_sample",
        ),
        ([_part("ref_text", b"x" * 101)], 413, r"ref_text is over", "ref_text"),
        ([_part("ref_text", b"\xff\xfe")], 400, r"form field 'ref_text' is not valid UTF-8", "ref_text"),
        ([_part(f"f{i}", b"x") for i in range(17)], 400, r"more than 16 form fields", None),
    ],
)
def test_multipart_refusals(parts, status, message, param):
    with pytest.raises(UploadError, match=message) as err:
        _form(_multipart(*parts))
    assert (err.value.status, err.value.param) == (status, param)


def test_a_multipart_body_without_its_closing_boundary_or_boundary_parameter():
    with pytest.raises(UploadError, match="ended before its closing boundary"):
        _form(_multipart(_part("name", b"x"), close=False))
    client = _Client([b""])
    with pytest.raises(UploadError, match="needs the boundary parameter"):
        _run(read_form(_request(client, "multipart/form-data"), files={}, field_bytes=10))


def test_a_multipart_body_past_its_total_is_refused_from_content_length():
    client = _Client([b"x"], endless=True)
    request = _request(client, f"multipart/form-data; boundary={BOUNDARY}", content_length=10_000_000)
    with pytest.raises(UploadError, match=r"the request body is 9\.54 MB") as err:
        _run(read_form(request, files={"audio_sample": 4000}, field_bytes=100))
    assert err.value.status == 413 and client.pulled == 0


# ---- the voice checks made before the DAC encode ----


def test_check_can_add_refuses_bad_names_taken_names_and_a_full_store(tmp_path):
    store = VoiceStore(tmp_path, max_voices=1)
    with pytest.raises(VoiceStoreError, match="voice name '../x'") as err:
        store.check_can_add("../x")
    assert err.value.status == 400
    store.check_can_add("alice")
    store.add("alice", "Hi.", torch.zeros(12, 3, dtype=torch.long))
    with pytest.raises(VoiceStoreError, match="a voice named 'Alice' exists") as err:
        store.check_can_add("Alice")
    assert err.value.status == 409
    with pytest.raises(VoiceStoreError, match=r"voice limit reached \(1 uploaded voices") as err:
        store.check_can_add("bob")
    assert err.value.status == 409
