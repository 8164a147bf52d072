"""The Serve app over real HTTP on loopback: a local Ray, Serve on a free port, the tiny preset
with generated weights, called with httpx and the `openai` client. One deployment for the
module (phase 1), then a redeploy with other settings (phase 2: restart keeps voices, API keys,
engine queue full → 429). The web page runs in headless Debian chromium (Playwright)."""

import asyncio
import base64
import io
import json
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import soundfile as sf
import yaml
from openai import OpenAI
from ray import serve
from ray.serve.schema import ServeDeploySchema

from unimoe_ray.apps.ports import free_port
from unimoe_ray.data.mini_corpus import write_mp4
from unimoe_ray.serve.app import build_app
from unimoe_ray.serve.voices import ANONYMOUS, VoiceStore

pytestmark = pytest.mark.ray

RATE = 24000
MODEL = {
    "preset": "tiny",
    "max_rows": 8,
    "max_len": 1200,
    "torch_threads": 1,
    "first_chunk_frames": 3,
    "chunk_frames": 10,
}


def _args(tmp, **ingress):
    model = dict(MODEL, artifacts_dir=str(tmp / "artifacts"))
    ing = {
        "voices_dir": str(tmp / "voices"),
        "speech_max_seconds": 20,
        "speech_default_seconds": 1,
        "music_max_seconds": 4,
        "music_default_seconds": 1,
        "max_upload_mb": 0.2,
        "max_voices": 2,
        "api_keys_env": None,
    }
    ing.update(ingress)
    return {"ingress": ing, "speech": model, "music": model}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    metrics_port = free_port()  # Ray's Prometheus export (the node's metrics agent)
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_args(tmp)), name="unimoe", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "tmp": tmp, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _wav_bytes(seconds: float, rate: int) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _parse(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2"), RATE
    if data[:4] == b"RIFF" and struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF:  # streamed wav
        assert struct.unpack("<I", data[24:28])[0] == RATE
        return np.frombuffer(data[44:], dtype="<i2"), RATE
    wav, sr = sf.read(io.BytesIO(data), dtype="int16")
    return wav, sr


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def _good(http) -> None:
    r = http.post("/v1/audio/speech", json={"input": "ok", "response_format": "wav", "max_seconds": 0.2})
    assert r.status_code == 200, r.text
    assert _parse(r.content, "wav")[0].shape == (int(0.2 * RATE),)


# ---- phase 1 ----


def test_models_health_and_shipped_voice(http):
    assert http.get("/health").json() == {"status": "ok"}
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "unimoe-audio" in ids and "tts-1" in ids
    voices = http.get("/v1/audio/voices").json()
    assert voices["voices"] == ["default"] and voices["data"][0]["origin"] == "library"


@pytest.mark.parametrize("fmt", ["wav", "flac", "pcm", "mp3", "opus"])
def test_openai_client_speech_formats(client, fmt):
    resp = client.audio.speech.create(
        model="tts-1",
        voice="default",
        input="Hello there.",
        response_format=fmt,
        extra_body={"max_seconds": 1, "seed": 3},
    )
    data = resp.content
    ctype = resp.response.headers["content-type"]
    assert ctype.startswith(
        {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg"}[fmt]
    )
    wav, sr = _parse(data, fmt)
    assert sr == RATE
    # Speech may not end before 2 s (the released minimum), so max_seconds=1 gives exactly 1 s.
    if fmt in ("mp3", "opus"):  # lossy codecs pad their frames
        assert abs(len(wav) - RATE) < 0.1 * RATE
    else:
        assert len(wav) == RATE


def test_streamed_equals_non_streamed_and_speed(client, http):
    body = dict(
        model="unimoe-audio", voice="default", input="Streaming check.", extra_body={"max_seconds": 2, "seed": 5}
    )
    with client.audio.speech.with_streaming_response.create(response_format="pcm", **body) as resp:
        assert resp.headers["content-type"].startswith("audio/pcm")
        chunks = list(resp.iter_bytes())
    streamed = np.frombuffer(b"".join(chunks), dtype="<i2")
    whole, sr = _parse(client.audio.speech.create(response_format="flac", **body).content, "flac")
    assert streamed.shape == whole.shape == (2 * RATE,)
    # Chunk joins decoded with the DAC's receptive field as context: float rounding only.
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 4
    fast = client.audio.speech.create(response_format="wav", speed=2.0, **body).content
    assert abs(len(_parse(fast, "wav")[0]) - RATE) <= 0.01 * RATE  # half as long, pitch kept


def test_sse_stream(http):
    events = []
    with http.stream(
        "POST",
        "/v1/audio/speech",
        json={
            "input": "Events.",
            "voice": "default",
            "response_format": "pcm",
            "stream_format": "sse",
            "max_seconds": 1,
        },
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) == 2 * RATE and events[-1]["usage"]["output_tokens"] == 50


def test_voice_upload_clone_and_inline_reference(http, client):
    up = http.post(
        "/v1/audio/voices",
        files={"audio_sample": ("me.wav", _wav_bytes(1.5, 22050), "audio/wav")},
        data={"name": "narrator", "ref_text": "This is the narrator."},
    )
    assert up.status_code == 200, up.text
    assert up.json()["name"] == "narrator" and up.json()["id"].startswith("voice_")
    got = http.get("/v1/audio/voices/narrator").json()
    assert got["frames"] == 75 and got["origin"] == "upload"  # 1.5 s at 50 frames/s, resampled from 22.05 kHz
    by_id = client.audio.speech.create(
        model="unimoe-audio",
        voice=up.json()["id"],
        input="Cloned.",
        response_format="wav",
        extra_body={"max_seconds": 1, "seed": 1},
    )
    by_name = client.audio.speech.create(
        model="unimoe-audio",
        voice="narrator",
        input="Cloned.",
        response_format="wav",
        extra_body={"max_seconds": 1, "seed": 1},
    )
    assert by_id.content == by_name.content
    inline = http.post(
        "/v1/audio/speech",
        json={
            "input": "Cloned.",
            "response_format": "wav",
            "max_seconds": 1,
            "seed": 1,
            "reference_audio": base64.b64encode(_wav_bytes(1.5, 22050)).decode(),
            "reference_text": "This is the narrator.",
        },
    )
    assert inline.status_code == 200, inline.text
    plain = http.post(
        "/v1/audio/speech", json={"input": "Cloned.", "response_format": "wav", "max_seconds": 1, "seed": 1}
    )
    # Same reference → same codes as the stored voice; no voice → another prompt, other audio.
    assert inline.content == by_name.content and plain.content != by_name.content
    # The cap: max_voices=2 uploads.
    second = http.post(
        "/v1/audio/voices",
        files={"audio_sample": ("b.wav", _wav_bytes(1, 16000), "audio/wav")},
        data={"name": "second", "ref_text": "Second voice."},
    )
    assert second.status_code == 200
    third = http.post(
        "/v1/audio/voices",
        files={"audio_sample": ("c.wav", _wav_bytes(1, 16000), "audio/wav")},
        data={"name": "third", "ref_text": "Third voice."},
    )
    _error(third, 409)
    assert http.delete("/v1/audio/voices/second").json()["success"] is True
    _error(http.get("/v1/audio/voices/second"), 404)
    _error(http.delete("/v1/audio/voices/default"), 403)


def test_music_text_and_video(http, server):
    r = http.post(
        "/v1/audio/music", json={"prompt": "A calm piano piece.", "duration": 1.5, "seed": 2, "response_format": "flac"}
    )
    assert r.status_code == 200, r.text
    wav, sr = _parse(r.content, "flac")
    assert sr == RATE and len(wav) == int(1.5 * RATE)
    video = server["tmp"] / "clip.mp4"
    frames = np.zeros((8, 56, 56, 3), np.uint8)
    frames[:, 10:30, 10:30] = 200
    write_mp4(video, frames, fps=4)
    with open(video, "rb") as f:
        r = http.post(
            "/v1/audio/music",
            files={"video": ("clip.mp4", f, "video/mp4")},
            data={"prompt": "Music for this clip.", "duration": "1", "stream": "true", "response_format": "wav"},
        )
    assert r.status_code == 200, r.text
    wav, sr = _parse(r.content, "wav")
    assert sr == RATE and len(wav) == RATE


BAD = [
    ("speech", {"input": ""}, 400, "input"),
    ("speech", {"input": "x" * 4097}, 400, "input"),
    ("speech", {"input": "hi", "voice": "nobody"}, 400, "voice"),
    ("speech", {"input": "hi", "response_format": "aac"}, 400, "response_format"),
    ("speech", {"input": "hi", "speed": 5}, 400, "speed"),
    ("speech", {"input": "hi", "response_format": "mp3", "stream_format": "sse"}, 400, "stream_format"),
    ("speech", {"input": "hi", "response_format": "pcm", "stream_format": "sse", "speed": 2}, 400, "stream_format"),
    ("speech", {"input": "hi", "max_seconds": 99}, 400, "max_seconds"),
    ("speech", {"input": "hi", "temperature": 1e-300}, 400, None),  # 0 in float32: refused, never divided by
    ("speech", {"input": "hi", "seed": 2**64}, 400, "seed"),  # once wedged the replica (rows leaked)
    ("speech", {"input": "hi", "seed": -1}, 400, "seed"),
    ("music", {"prompt": "piano", "seed": 2**64}, 400, "seed"),
    ("speech", {"input": "hi", "volume": 3}, 400, "volume"),
    ("speech", {"input": "hi", "model": "gpt-9"}, 404, "model"),
    ("speech", {"input": "hi", "reference_audio": "###"}, 400, "reference_audio"),
    (
        "speech",
        {"input": "hi", "reference_audio": base64.b64encode(b"not audio").decode(), "reference_text": "x"},
        400,
        None,
    ),
    (
        "speech",
        {"input": "hi", "reference_audio": base64.b64encode(b"0" * 230_000).decode(), "reference_text": "x"},
        413,
        "reference_audio",
    ),
    ("music", {"prompt": "piano", "duration": 0}, 400, "duration"),
    ("music", {"prompt": "piano", "duration": 60}, 400, "duration"),
    ("music", {"prompt": " "}, 400, "prompt"),
    ("music", {"prompt": "piano", "stream": True, "response_format": "flac"}, 400, "response_format"),
]


def test_bad_inputs_get_4xx_and_the_replica_keeps_serving(http):
    for kind, body, status, param in BAD:
        _error(http.post(f"/v1/audio/{kind}", json=body), status, param)
    # temperature 0 is greedy decoding: the same audio twice, whatever the seed.
    greedy = [
        http.post(
            "/v1/audio/speech",
            json={"input": "Greedy.", "response_format": "pcm", "max_seconds": 1, "temperature": 0, "seed": seed},
        )
        for seed in (1, 2)
    ]
    assert [r.status_code for r in greedy] == [200, 200] and greedy[0].content == greedy[1].content
    status = _speech_status(http)
    assert status["running_rows"] == 0 and status["free_rows"] == status["max_rows"] and status["healthy"]
    _error(http.post("/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(
        http.post(
            "/v1/audio/voices",
            files={"audio_sample": ("x.wav", b"garbage bytes", "audio/wav")},
            data={"name": "junk", "ref_text": "words"},
        ),
        400,
    )
    _error(
        http.post(
            "/v1/audio/voices",
            files={"audio_sample": ("x.wav", _wav_bytes(1, 16000), "audio/wav")},
            data={"name": "nowords"},
        ),
        400,
        "ref_text",
    )
    _error(
        http.post(
            "/v1/audio/voices",
            files={"audio_sample": ("x.wav", _wav_bytes(8, 16000), "audio/wav")},
            data={"name": "huge", "ref_text": "words"},
        ),
        413,
        "audio_sample",
    )
    _error(
        http.post(
            "/v1/audio/music",
            files={"video": ("v.mp4", b"not a video", "video/mp4")},
            data={"prompt": "piano", "duration": "1"},
        ),
        400,
    )
    _good(http)


def test_sample_rate_bomb_and_oversized_body_are_refused_before_any_work(http):
    """The 4 KB WAV declaring 999983 Hz that once grew a replica to 19.7 GB: a 400 from its header.
    A JSON body past the cap (0.2 MB upload + base64 and text room): a 413 before it is read."""
    bomb = (Path(__file__).parents[1] / "data" / "hostile" / "sample_rate_bomb.wav").read_bytes()
    err = _error(
        http.post(
            "/v1/audio/voices",
            files={"audio_sample": ("bomb.wav", bomb, "audio/wav")},
            data={"name": "bomb", "ref_text": "words"},
        ),
        400,
    )
    assert "999983 Hz" in err["message"] and "8000-192000 Hz" in err["message"]
    err = _error(http.post("/v1/audio/speech", json={"input": "x" * 1_000_000}), 413)
    assert err["code"] == "file_too_large" and "max_upload_mb=0.2" in err["message"]
    _good(http)


def _speech_status(http) -> dict:
    return http.get("/v1/status").json()["speech"]


def test_a_disconnected_stream_frees_its_row(http):
    before = _speech_status(http)
    with http.stream(
        "POST", "/v1/audio/speech", json={"input": "A long one.", "response_format": "pcm", "max_seconds": 20}
    ) as r:
        next(r.iter_bytes())  # audio is flowing; ~950 of 981 steps to go when the client leaves
    deadline = time.monotonic() + 30
    while _speech_status(http)["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.2)
    status = _speech_status(http)
    # Freed by the cancel, not by finishing: no request finished meanwhile.
    assert status["running_rows"] == 0 and status["cancelled"] == before["cancelled"] + 1
    assert status["finished"] == before["finished"]
    _good(http)


def test_web_page_plays_tts_in_headless_chromium(server):
    from playwright.sync_api import sync_playwright

    shot = server["tmp"] / "web.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            headless=True,
            args=[
                "--no-sandbox",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--disable-gpu",
            ],
        )
        page = browser.new_page()
        page.goto(server["url"] + "/")
        page.wait_for_function("document.querySelector('#voice').options.length > 1")
        page.fill("#tts-seconds", "1")
        page.click("#speak")
        page.wait_for_function(
            "['done', 'error'].includes(document.querySelector('#tts-status').dataset.state)", timeout=60_000
        )
        status = page.eval_on_selector("#tts-status", "e => [e.dataset.state, e.textContent, e.dataset.samples]")
        assert status[0] == "done", status
        assert int(float(status[2])) == RATE  # 1 s at 24 kHz reached the page's player
        assert page.eval_on_selector("#tts-audio", "a => a.src.startsWith('blob:')")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000


def _samples(text: str, name: str) -> list[float]:
    """Values of the Prometheus samples `name{...}` in an exposition text."""
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]


def test_prometheus_metrics_are_exported(server, http):
    """Ray's metrics export carries the replica's metrics: TTFA and RTF histograms, audio
    seconds, queue depth, running rows and requests, experts per token (Ray prefixes ray_)."""
    _good(http)
    want = {
        "ray_unimoe_time_to_first_audio_seconds_count": lambda v: max(v) >= 1,
        "ray_unimoe_real_time_factor_count": lambda v: max(v) >= 1,
        "ray_unimoe_audio_seconds_total": lambda v: max(v) > 0,
        "ray_unimoe_engine_queue_depth": lambda v: min(v) >= 0,
        "ray_unimoe_engine_active_rows": lambda v: min(v) >= 0,
        "ray_unimoe_engine_active_requests": lambda v: min(v) >= 0,
        "ray_unimoe_experts_per_token": lambda v: max(v) > 0,  # the tiny preset is a DCMoE
    }
    deadline, missing = time.monotonic() + 90, set(want)
    while missing and time.monotonic() < deadline:  # the agent exports every few seconds
        text = httpx.get(server["metrics"], timeout=10).text
        missing = {n for n, ok in want.items() if not (_samples(text, n) and ok(_samples(text, n)))}
        if missing:
            time.sleep(2)
    assert not missing, f"not exported (or wrong) after 90 s: {sorted(missing)}"


# ---- phase 2: a redeploy with other settings ----

# Per-key limits loose enough that the capacity checks below reach the engine and Serve's queue.
LOOSE_KEY_LIMITS = {"rate_limit_burst": 200, "max_concurrent_per_key": 32}


def _deploy_config(tmp, keys, *, max_waiting: int, max_input_chars: int = 4096, **ingress) -> None:
    """serve_configs/local_cpu.yaml as `serve run`/`serve deploy` submit it (the declarative
    path, where a changed user_config reconfigures replicas in place), with test paths and a
    small capacity: the engine runs one guided request (2 slots) and queues `max_waiting`; the
    replica takes 3 requests at a time, Serve queues 4 more; beyond: 429 (engine) / 503 (Serve)."""
    cfg = yaml.safe_load((Path(__file__).parents[2] / "serve_configs" / "local_cpu.yaml").read_text())
    cfg.pop("http_options")  # Serve is already up on the test's port
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    args = _args(tmp, api_keys_file=str(keys), max_input_chars=max_input_chars, **{**LOOSE_KEY_LIMITS, **ingress})
    deps["APIIngress"]["user_config"] = args["ingress"]
    for name in ("SpeechModel", "MusicModel"):
        d = deps[name]
        d["user_config"] = dict(args["speech"], max_rows=2, max_waiting=max_waiting)
        d.pop("autoscaling_config")
        d.update(num_replicas=1, max_ongoing_requests=3, max_queued_requests=4)
    from ray.serve.context import _get_global_client  # what `serve run config.yaml` calls

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg))
    # Serve's own `_blocking=True` gives up after a fixed 60 s; two replicas loading a model
    # beside the other xdist process on a loaded 2-core CI machine took longer than that.
    deadline = time.monotonic() + 300
    while (status := serve.status().applications.get("unimoe")) is None or status.status != "RUNNING":
        assert time.monotonic() < deadline, f"the redeployed app is not RUNNING after 300 s: {status}"
        assert status is None or status.status != "DEPLOY_FAILED", f"the redeploy failed: {status}"
        time.sleep(1)


def test_restart_keeps_voices_api_keys_over_capacity_and_live_reconfigure(server):
    tmp = server["tmp"]
    keys = tmp / "keys.txt"
    keys.write_text("# one key per line\nsecret-1\n")
    serve.delete("unimoe")
    _deploy_config(tmp, keys, max_waiting=1)
    auth = {"Authorization": "Bearer secret-1"}
    with httpx.Client(base_url=server["url"], timeout=120) as http:
        assert http.get("/health").status_code == 200  # open without a key
        _error(http.get("/v1/audio/voices"), 401)
        _error(http.get("/v1/audio/voices", headers={"Authorization": "Bearer wrong"}), 401)
        # narrator, uploaded with auth off in phase 1, survived the restart; it belongs to the
        # anonymous owner, so a caller with a key sees the library voice only.
        assert http.get("/v1/audio/voices", headers=auth).json()["voices"] == ["default"]
        anonymous = VoiceStore(tmp / "voices", max_voices=2).list(owner=ANONYMOUS)
        assert [v.name for v in anonymous] == ["default", "narrator"]

    async def flood(n: int):
        async with httpx.AsyncClient(base_url=server["url"], timeout=120, headers=auth) as h:
            body = {"input": "Busy.", "response_format": "pcm", "speed": 1.5, "max_seconds": 8}  # whole-file answers
            return await asyncio.gather(*(h.post("/v1/audio/speech", json=body) for _ in range(n)))

    answers = asyncio.run(flood(12))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 429, 503} and 429 in codes and 503 in codes and codes.count(200) >= 2, codes
    for r in answers:
        if r.status_code != 200:
            err = _error(r, r.status_code)
            assert r.headers["retry-after"] == "2"
            assert err["type"] == {429: "rate_limit_error", 503: "server_overloaded"}[r.status_code]
    with httpx.Client(base_url=server["url"], timeout=120, headers=auth) as http:
        _good(http)  # and it keeps serving
        before = _speech_status(http)
        # A changed user_config reconfigures the running replicas: no restart, counters survive.
        _deploy_config(tmp, keys, max_waiting=5, max_input_chars=10)
        _error(http.post("/v1/audio/speech", json={"input": "eleven char", "max_seconds": 0.2}), 400, "input")
        _good(http)
        after = _speech_status(http)
        assert after["steps"] > before["steps"] and after["finished"] == before["finished"] + 1


def _upload(http, key: str, name: str):
    return http.post(
        "/v1/audio/voices",
        headers={"Authorization": f"Bearer {key}"},
        files={"audio_sample": ("v.wav", _wav_bytes(1, 16000), "audio/wav")},
        data={"name": name, "ref_text": f"The voice {name}."},
    )


def test_stream_limit_per_key_voice_owners_and_key_file_reload(server):
    """Phase 2, continued: one stream in flight per key (429 + Retry-After past it), voices
    seen by their uploader's key only, and an edited key file taking effect while serving."""
    tmp = server["tmp"]
    keys = tmp / "keys.txt"
    keys.write_text("secret-1\nsecret-2\n")
    _deploy_config(tmp, keys, max_waiting=5, max_concurrent_per_key=1)  # a live reconfigure
    one, two = {"Authorization": "Bearer secret-1"}, {"Authorization": "Bearer secret-2"}
    with httpx.Client(base_url=server["url"], timeout=120) as http:
        long = {"input": "A long one.", "response_format": "pcm", "max_seconds": 20}
        with http.stream("POST", "/v1/audio/speech", json=long, headers=one) as r:
            assert r.status_code == 200
            chunks = r.iter_bytes()  # kept: a dropped iterator closes the connection at once
            next(chunks)  # streaming: secret-1's one place is taken until the stream ends
            busy = http.post("/v1/audio/speech", json={"input": "Another.", "max_seconds": 0.2}, headers=one)
            err = _error(busy, 429)
            assert (err["code"], err["type"]) == ("rate_limit_exceeded", "rate_limit_error")
            assert int(busy.headers["retry-after"]) >= 1
            _error(_upload(http, "secret-1", "blocked"), 429)  # uploads count too
            up = _upload(http, "secret-2", "alice")  # the limit is per key
            assert up.status_code == 200, up.text
        alice = up.json()["id"]
        # The client left: the ingress frees the place when the cancelled stream ends.
        deadline = time.monotonic() + 30
        while (r := _upload(http, "secret-1", "alice")).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200, r.text  # its own "alice": names are unique per key
        mine = r.json()["id"]
        assert mine != alice
        assert http.get("/v1/audio/voices/alice", headers=one).json()["id"] == mine
        assert http.get("/v1/audio/voices/alice", headers=two).json()["id"] == alice
        _error(http.get(f"/v1/audio/voices/{alice}", headers=one), 404)  # another key's voice: not found
        _error(http.delete(f"/v1/audio/voices/{alice}", headers=one), 404)
        _error(http.post("/v1/audio/speech", json={"input": "hi", "voice": alice}, headers=one), 400, "voice")
        assert http.delete("/v1/audio/voices/alice", headers=one).json()["id"] == mine
        assert http.get("/v1/audio/voices", headers=one).json()["voices"] == ["default"]
        listed = http.get("/v1/audio/voices", headers=two).json()
        assert listed["voices"] == ["default", "alice"] and listed["data"][1]["id"] == alice
        spoken = http.post(
            "/v1/audio/speech",
            headers=two,
            json={"input": "Mine.", "voice": "alice", "response_format": "wav", "max_seconds": 0.2},
        )
        assert spoken.status_code == 200, spoken.text

        # Edit the key file while serving (no redeploy): secret-1 out, secret-3 in.
        keys.write_text("secret-2\nsecret-3-new\n")
        three = {"Authorization": "Bearer secret-3-new"}
        deadline = time.monotonic() + 30
        while http.get("/v1/models", headers=three).status_code == 401 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get("/v1/models", headers=three).status_code == 200
        _error(http.get("/v1/models", headers=one), 401)
        assert http.get("/v1/audio/voices", headers=two).json()["voices"] == ["default", "alice"]
