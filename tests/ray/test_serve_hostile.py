"""Hostile traffic against one real `serve run serve_configs/local_cpu.yaml`, started the way a
user starts it on a Ray cluster: `ray start --head` (own HOME holding ~/.ray/auth_token, so Ray's
token authentication is on; own temp dir and free ports), then `serve run <config> --address`
with RAY_AUTH_MODE=token. The config is the shipped one with test paths, the tiny preset, one
replica per model and short durations.

In this order (the replica kills last, since each restart costs a model load):
- schemathesis, driven by the app's own /openapi.json, sends a bounded number of generated
  requests to every route: no 5xx, no request left hanging; afterwards every engine slot is free
  and a normal request succeeds;
- the hand-made hostile files of tests/data/hostile (tests/data/make_hostile_files.py) uploaded
  as a voice, as inline reference audio and as a video: each refused with a 4xx while a good
  request decodes beside them;
- a SpeechModel replica SIGKILLed while it decodes a whole-file request, an SSE stream and a raw
  PCM stream: each client gets a clear error (a 5xx JSON naming the request id; an SSE error
  event; a chunked body that never ends cleanly, which the HTTP client reports), Serve starts a
  new replica, the next requests succeed and the uploaded voices are all still there.

Processes are stopped by session: the head and `serve run` each start in a new session, and
every process Ray spawns for them keeps it, so killing that session's processes stops exactly
what this module started."""

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from cluster_head import BIN, HeadPorts, ray_start_head

# 600 s, not the suite's 300: the first server test also pays the module's start (a Ray head,
# `serve run`, two model loads), which on the shared 2-core machine took up to 145 s.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
HOSTILE = REPO / "tests" / "data" / "hostile"
# Hostile files that are legal at the limit (tests/data/make_hostile_files.py): accepted.
ACCEPTED_VOICES = {"channels_8.wav"}
RATE = 24000
REQUEST_TIMEOUT_S = 60  # per request, client side: a request that needs longer has hung
SPEECH_REPLICA = "ServeReplica:unimoe:SpeechModel"


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a process started with start_new_session=True
    and whatever it spawned, daemons included)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            session = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
            if session == sid and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def _test_config(tmp: Path, port: int) -> Path:
    """serve_configs/local_cpu.yaml with test paths, the tiny preset, one replica per model and
    short durations; everything else (engine sizes, limits, timeouts) as shipped."""
    cfg = yaml.safe_load((REPO / "serve_configs" / "local_cpu.yaml").read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    deps["APIIngress"]["user_config"] = dict(
        deps["APIIngress"]["user_config"],
        voices_dir=str(tmp / "voices"),
        api_keys_env=None,
        speech_max_seconds=2,
        speech_default_seconds=0.5,
        music_max_seconds=2,
        music_default_seconds=0.5,
    )
    for name in ("SpeechModel", "MusicModel"):
        d = deps[name]
        d.pop("autoscaling_config")
        d["num_replicas"] = 1
        # A copy each: the YAML shares one user_config (&model) between the two.
        d["user_config"] = dict(
            d["user_config"], preset="tiny", artifacts_dir=str(tmp / "artifacts"), expert_dtype=None, torch_threads=1
        )
    path = tmp / "serve_test.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass(frozen=True)
class Server:
    url: str
    dashboard: str
    token: str
    log: Path

    def replicas(self) -> list[dict]:
        """The live SpeechModel replica actors (Ray's state API, with the cluster's token)."""
        params = [
            ("filter_keys", "class_name"),
            ("filter_predicates", "="),
            ("filter_values", SPEECH_REPLICA),
            ("filter_keys", "state"),
            ("filter_predicates", "="),
            ("filter_values", "ALIVE"),
        ]
        r = httpx.get(
            f"{self.dashboard}/api/v0/actors",
            params=params,
            timeout=30,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _wait_until(what: str, ready, server_log, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = ready()
        except (httpx.HTTPError, KeyError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout_s:.0f} s\n{server_log()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_hostile")
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env |= {"HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '')}"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit
    ports = HeadPorts.allocate(extra=1)
    gcs, dash, http = ports.gcs, ports.dashboard, ports.extra[0]
    sessions = []
    log = tmp / "serve_run.log"
    try:
        head = subprocess.Popen(
            ray_start_head(temp_dir, ports),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sessions.append(head.pid)
        out = head.communicate(timeout=180)[0].decode(errors="replace")
        assert head.returncode == 0, out[-3000:]
        config = _test_config(tmp, http)
        with open(log, "wb") as f:
            run = subprocess.Popen(
                [str(BIN / "serve"), "run", str(config), "--address", f"127.0.0.1:{gcs}"],
                env={**env, "RAY_AUTH_MODE": "token"},
                cwd=tmp,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sessions.append(run.pid)
        srv = Server(
            url=f"http://127.0.0.1:{http}",
            dashboard=f"http://127.0.0.1:{dash}",
            token=(home / ".ray" / "auth_token").read_text().strip(),
            log=log,
        )

        def up():
            assert run.poll() is None, f"serve run exited ({run.returncode})\n{srv.log_tail()}"
            return httpx.get(srv.url + "/v1/status", timeout=10).status_code == 200  # both models loaded

        _wait_until("the app answers /v1/status", up, srv.log_tail, 300)
        yield srv
    finally:
        for sid in sessions:
            _kill_session(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as c:
        yield c


def _wav_bytes(seconds: float, rate: int, freq: float = 150.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def _good(http, **extra) -> None:
    body = {"input": "A normal request.", "response_format": "wav", "max_seconds": 0.2, **extra}
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    wav, sr = sf.read(io.BytesIO(r.content), dtype="int16")
    assert sr == RATE and len(wav) == int(0.2 * RATE)


def _slots_free(http) -> dict:
    def free():
        status = http.get("/v1/status").json()
        engines = [status["speech"], status["music"]]
        busy = any(e["running_rows"] or e["running_requests"] for e in engines)
        return None if busy else status

    # A cancelled stream frees its rows at the engine's next step: wait for it, bounded.
    return _wait_until("every engine slot free", free, lambda: json.dumps(http.get("/v1/status").json()), 30)


def test_the_shipped_configs_bound_every_request():
    for name in ("local_cpu", "gpu", "npu"):
        cfg = yaml.safe_load((REPO / "serve_configs" / f"{name}.yaml").read_text())
        assert cfg["http_options"]["request_timeout_s"] >= 60, name  # above the longest legitimate request


# ---- schemathesis from the app's own schema ----


def _routes() -> list[tuple[str, str, bool]]:
    """(method, path, takes a body) of every operation in the app's OpenAPI schema."""
    from unimoe_ray.serve.app import app

    return sorted(
        (m.upper(), path, "requestBody" in op) for path, ops in app.openapi()["paths"].items() for m, op in ops.items()
    )


ROUTES = _routes()
# Positive cases (valid by the schema) for every route; negative ones (each breaking the schema
# somewhere) where there is input to break: the request bodies.
FUZZ = [(m, p, "positive") for m, p, _ in ROUTES] + [(m, p, "negative") for m, p, body in ROUTES if body]


@pytest.fixture(scope="module")
def api_schema(server):
    """The live server's schema: the same operations as the app's, with request bodies (the
    routes parse them by hand; app.py gives them as openapi_extra)."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    live = sorted(
        (m.upper(), path, "requestBody" in op)
        for path, ops in schema.raw_schema["paths"].items()
        for m, op in ops.items()
    )
    assert live == ROUTES and len(list(schema.get_all_operations())) == len(ROUTES)
    assert {(m, p) for m, p, body in ROUTES if body} == {
        ("POST", "/v1/audio/speech"),
        ("POST", "/v1/audio/music"),
        ("POST", "/v1/audio/voices"),
    }
    return schema


@pytest.mark.parametrize("method, path, mode", FUZZ)
def test_generated_requests_get_no_5xx_and_never_hang(api_schema, method, path, mode):
    operation = api_schema[path][method]
    seen: dict[int, int] = {}

    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    @settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def one(case):
        response = case.call(timeout=REQUEST_TIMEOUT_S)  # a hang fails as a timeout
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])

    one()
    assert seen and max(seen) < 500, seen


def test_after_the_fuzz_every_slot_is_free_and_a_normal_request_succeeds(http):
    _slots_free(http)
    _good(http, voice="default")


# ---- hand-made hostile files ----


def _hostile_files() -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(HOSTILE.iterdir())} if HOSTILE.is_dir() else {}
    assert files, f"{HOSTILE} is empty or missing: run python tests/data/make_hostile_files.py"
    return files


def test_each_hostile_file_gets_a_4xx_and_a_good_request_beside_them_succeeds(http, server):
    files = _hostile_files()
    beside: list[httpx.Response] = []

    def good_stream():  # a streamed request decoding while the hostile uploads arrive
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as c:
            beside.append(
                c.post(
                    "/v1/audio/speech",
                    json={"input": "Beside them.", "response_format": "pcm", "max_seconds": 2, "seed": 4},
                )
            )

    worker = threading.Thread(target=good_stream)
    worker.start()
    for name, data in files.items():
        voice = http.post(
            "/v1/audio/voices",
            files={"audio_sample": (name, data, "application/octet-stream")},
            data={"name": f"h_{name.replace('.', '_')}", "ref_text": "Hostile words."},
        )
        inline = http.post(
            "/v1/audio/speech",
            json={
                "input": "Hi.",
                "response_format": "wav",
                "max_seconds": 0.2,
                "reference_audio": base64.b64encode(data).decode(),
                "reference_text": "Hostile words.",
            },
        )
        video = http.post(
            "/v1/audio/music",
            files={"video": (name, data, "application/octet-stream")},
            data={"prompt": "Music for this.", "duration": "0.2", "response_format": "wav"},
        )
        for r in (video, *(() if name in ACCEPTED_VOICES else (voice, inline))):
            assert 400 <= r.status_code < 500, (name, r.request.url.path, r.status_code, r.text)
            _error(r, r.status_code)
        if name in ACCEPTED_VOICES:
            assert voice.status_code == inline.status_code == 200, (name, voice.text, inline.text)
    worker.join(timeout=REQUEST_TIMEOUT_S + 10)
    assert beside and beside[0].status_code == 200, beside and beside[0].text
    assert len(beside[0].content) == 2 * RATE * 2  # 2 s of 16-bit PCM: not cut by its neighbours
    _slots_free(http)
    _good(http)


# ---- a model replica SIGKILLed mid-request ----


def _upload(http, name: str, freq: float) -> str:
    r = http.post(
        "/v1/audio/voices",
        files={"audio_sample": (f"{name}.wav", _wav_bytes(1.0, 16000, freq), "audio/wav")},
        data={"name": name, "ref_text": f"This is {name}."},
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_sigkill_of_a_replica_mid_request_fails_those_requests_clearly_and_serve_recovers(server, http):
    """Three requests decode on the SpeechModel replica when it is SIGKILLed: a whole-file one
    (FLAC), an SSE stream and a raw PCM stream, both streams past their first audio chunk."""
    voices = {name: _upload(http, name, freq) for name, freq in (("alice", 180.0), ("bob", 120.0))}
    (replica,) = server.replicas()
    # 2 s (the test config's longest) with a voice prompt: the kill lands while frames decode.
    body = {"input": "A request that will lose its replica.", "voice": "alice", "max_seconds": 2, "seed": 9}
    got: dict = {}
    streaming = {"sse": threading.Event(), "raw": threading.Event()}

    def whole_file():
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as c:
            got["whole"] = c.post("/v1/audio/speech", json={**body, "response_format": "flac"})

    def sse():
        events = got.setdefault("sse", [])
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as c:
            with c.stream(
                "POST", "/v1/audio/speech", json={**body, "response_format": "pcm", "stream_format": "sse"}
            ) as r:
                got["sse_status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        streaming["sse"].set()

    def raw():
        pcm = bytearray()
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as c:
            try:
                with c.stream("POST", "/v1/audio/speech", json={**body, "response_format": "pcm"}) as r:
                    got["raw_status"] = r.status_code
                    for chunk in r.iter_bytes():
                        pcm += chunk
                        streaming["raw"].set()
                got["raw_error"] = None
            except httpx.HTTPError as err:  # the transport's own error: the body ended early
                got["raw_error"] = err
        got["raw_bytes"] = len(pcm)

    workers = [threading.Thread(target=f) for f in (whole_file, sse, raw)]
    for w in workers:
        w.start()
    for name, started in streaming.items():
        assert started.wait(REQUEST_TIMEOUT_S), f"the {name} stream sent no audio\n{server.log_tail()}"
    os.kill(replica["pid"], signal.SIGKILL)
    for w in workers:
        w.join(timeout=REQUEST_TIMEOUT_S + 10)
        assert not w.is_alive(), "a request did not end after its replica died"

    r = got["whole"]  # not streamed: a 5xx JSON error naming the request id, nothing internal
    assert 500 <= r.status_code < 600, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    rid = r.headers.get("x-request-id")
    assert rid and f"request id {rid}" in err["message"], (dict(r.headers), err)
    for leak in ("Traceback", "ActorDiedError", "pid", str(replica["pid"]), replica["actor_id"]):
        assert leak not in r.text, (leak, r.text)
    # SSE: the headers went out before the kill; the stream ends with an error event, no done.
    kinds = [e["type"] for e in got["sse"]]
    assert got["sse_status"] == 200 and kinds[0] == "speech.audio.delta", kinds
    assert kinds[-1] == "error" and "speech.audio.done" not in kinds, kinds
    assert "request id" in got["sse"][-1]["error"]["message"] and "Traceback" not in json.dumps(got["sse"][-1])

    def replaced():
        return [a for a in server.replicas() if a["actor_id"] != replica["actor_id"]]

    _wait_until("Serve started a new SpeechModel replica", replaced, server.log_tail, 180)

    def serves():
        return (
            http.post(
                "/v1/audio/speech", json={"input": "Back.", "response_format": "wav", "max_seconds": 0.2}
            ).status_code
            == 200
        )

    _wait_until("speech served again", serves, server.log_tail, 120)
    listed = http.get("/v1/audio/voices").json()["data"]
    assert {v["name"]: v["id"] for v in listed if v["name"] in voices} == voices  # all still there
    for name in voices:
        _good(http, voice=name)  # and usable on the new replica
    _slots_free(http)
    # Raw PCM: cut short in a way the HTTP client reports (the chunked body never gets its
    # terminating chunk), not a clean end that looks like short audio.
    assert got["raw_status"] == 200 and got["raw_bytes"] < 2 * RATE * 2
    assert isinstance(got["raw_error"], httpx.RemoteProtocolError), (got["raw_error"], got["raw_bytes"])
