"""The HTTP API: a FastAPI ingress deployment in front of two model deployments (speech,
music), each a continuous-batching engine per replica (serve/model.py).

Endpoints (OpenAI's audio contract where one exists; errors in OpenAI's shape
{"error": {"message", "type", "param", "code"}}):
  POST /v1/audio/speech        text → speech (voices, cloning inline, formats, speed, SSE)
  POST /v1/audio/music         caption (+ optional video upload) → music
  POST/GET /v1/audio/voices, GET/DELETE /v1/audio/voices/{name}   the voice registry
  GET  /v1/models, GET /health, GET / (the web page)

`build_app(args)` is the app builder the serve_configs/*.yaml name.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods.

import asyncio
import base64
import binascii
import contextvars
import json
import logging
import re
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from unimoe_ray.serve import formats
from unimoe_ray.serve.auth import (
    CallerLimits,
    KeyRing,
    LimitExceeded,
    LimitPolicy,
    ResponseEndMiddleware,
    on_response_end,
)
from unimoe_ray.serve.model import AudioModel
from unimoe_ray.serve.runtime import AudioJob, sampling_overrides
from unimoe_ray.serve.schemas import (
    MODEL_ALIASES,
    MODEL_ID,
    APIError,
    MusicRequest,
    Sampling,
    SpeechRequest,
    validation_error,
)
from unimoe_ray.serve.settings import IngressSettings, SettingsError
from unimoe_ray.serve.uploads import UploadError, json_body_limit, read_body, read_form
from unimoe_ray.serve.voice_library import codes_tensor, ship_voices
from unimoe_ray.serve.voices import ANONYMOUS, VoiceStore, VoiceStoreError

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("unimoe_request_id", default="-")
_LOG = logging.getLogger("ray.serve")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _cause(err: BaseException) -> BaseException:
    """Ray wraps a replica's exception (RayTaskError); the original holds the clean message."""
    return getattr(err, "cause", None) or err


# Helpers above the ingress class: @serve.ingress serialises the class when it is decorated.
def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _usage(done: dict | None, job: AudioJob) -> dict:
    prompt = int(done.get("prompt_tokens", 0)) if done else 0
    frames = int(done.get("frames", 0)) if done else 0
    return {
        "input_tokens": prompt,
        "output_tokens": frames,
        "total_tokens": prompt + frames,
        "audio_seconds": done.get("seconds") if done else 0.0,
        "ttfa_s": done.get("ttfa_s") if done else None,
    }


def _usage_headers(done: dict | None, samples: int) -> dict:
    if not done:
        return {}
    return {
        "x-audio-frames": str(done["frames"]),
        "x-audio-samples": str(samples),
        "x-finish-reason": str(done["finish_reason"]),
        "x-wall-seconds": f"{done['wall_s']:.3f}",
    }


app = FastAPI(title="UniMoE-Audio on Ray Serve", docs_url="/docs")
app.add_middleware(ResponseEndMiddleware)  # frees a key's in-flight place when its response (or stream) ends


@app.exception_handler(APIError)
async def _api_error(request: Request, err: APIError):
    return err.response()


class RequestIdMiddleware:
    """Serve's proxy gives every HTTP request an id (header x-request-id, echoed as X-Request-ID
    in the response); 5xx bodies name it so a user's report finds the server-side log line.
    Pure ASGI on purpose: Starlette's BaseHTTPMiddleware (`@app.middleware`) ends a stream that
    failed after its headers with a clean final chunk, so a cut wav/pcm stream would look
    finished to the client."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            # The proxy keeps a client's own x-request-id: it reaches our error bodies and log
            # lines only if it is a plain token (no newlines or markup to forge log entries).
            rid = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
            _REQUEST_ID.set(rid if _SAFE_ID.fullmatch(rid) else uuid.uuid4().hex)
        await self.app(scope, receive, send)


app.add_middleware(RequestIdMiddleware)


def _internal_error(err: BaseException, status: int = 500, what: str = "the request failed") -> APIError:
    """A 5xx that carries the request id, never the exception's text (Ray errors hold
    tracebacks, pids and node addresses): that goes to the replica's log under the same id."""
    rid = _REQUEST_ID.get()
    _LOG.error("request %s: %s: %s", rid, what, "".join(traceback.format_exception(err)).rstrip())
    return APIError(
        status,
        f"internal error: {what} (request id {rid}); retry, and quote the id if it persists",
        code="internal_error",
    )


@app.exception_handler(Exception)
async def _server_error(request: Request, err: Exception):
    return _internal_error(err).response()


@serve.deployment(name="APIIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(app)
class APIIngress:
    def __init__(self, speech: DeploymentHandle, music: DeploymentHandle) -> None:
        self.speech = speech
        self.music = music
        self.settings = IngressSettings()
        self.store = VoiceStore(self.settings.voices_dir, max_voices=self.settings.max_voices)
        self._library_ready = False
        self._library_lock = asyncio.Lock()
        self.keyring = KeyRing()  # no key source: auth off until reconfigure reads the settings
        self.limits = CallerLimits()

    def reconfigure(self, user_config: dict) -> None:
        s = IngressSettings.from_dict(user_config)
        # Both built before anything is swapped: a bad key file or limit fails the deploy (fail
        # closed) and leaves a running replica as it was.
        keyring = KeyRing.from_settings(api_keys_env=s.api_keys_env, api_keys_file=s.api_keys_file)
        policy = LimitPolicy(
            per_minute=s.rate_limit_per_minute,
            burst=s.rate_limit_burst,
            max_in_flight=s.max_concurrent_per_key,
            retry_after_s=s.retry_after_s,
        )
        if (s.voices_dir, s.voice_library, s.voice_root, s.ship_default_voice) != (
            self.settings.voices_dir,
            self.settings.voice_library,
            self.settings.voice_root,
            self.settings.ship_default_voice,
        ):
            self._library_ready = False
        self.store = VoiceStore(s.voices_dir, max_voices=s.max_voices)
        self.limits.apply(policy)  # counts and buckets carry over: streams in flight stay counted
        self.settings, self.keyring = s, keyring

    # ---- helpers ----

    def _auth(self, request: Request, *, counted: bool = False) -> str | None:
        """The caller's identity — its key's owner id (auth.key_owner), or None with auth off —
        after charging the key's rate limit and, when `counted` (requests that generate or
        encode), taking one of its in-flight places until the response has ended."""
        if not self.keyring.enabled:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        caller = self.keyring.identify(token)
        if caller is None:
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        try:
            release = self.limits.admit(caller, counted=counted)
        except LimitExceeded as err:
            raise APIError(
                429, str(err), code="rate_limit_exceeded", headers={"Retry-After": str(err.retry_after_s)}
            ) from None
        if release is not None:
            on_response_end(request.scope, release)
        return caller

    def _check_model(self, model: str) -> None:
        if model not in (MODEL_ID, *MODEL_ALIASES):
            raise APIError(
                404,
                f"the model {model!r} does not exist: use {MODEL_ID!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def _json(self, request: Request, cls):
        s = self.settings
        # Room for one base64 file of max_upload_mb (inline reference_audio) and two texts.
        limit = json_body_limit(file_bytes=int(s.max_upload_mb * 2**20), text_chars=s.max_input_chars)
        try:
            raw = await read_body(request, limit=limit, hint=f" (max_upload_mb={s.max_upload_mb:g}, base64 included)")
        except UploadError as err:
            raise APIError(err.status, str(err), param=err.param, code=err.code) from None
        try:
            body = json.loads(raw)
        except Exception:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return cls.model_validate(body)
        except ValidationError as err:
            raise validation_error(err) from None

    async def _form(self, request: Request, file_field: str):
        """A multipart body parsed while it is read: `file_field` (the one file part) up to
        max_upload_mb, text fields up to 4 bytes per max_input_chars, nothing spooled to disk."""
        s = self.settings
        try:
            return await read_form(
                request,
                files={file_field: int(s.max_upload_mb * 2**20)},
                field_bytes=4 * s.max_input_chars + 1024,
                hint=f" (max_upload_mb={s.max_upload_mb:g})",
            )
        except UploadError as err:
            raise APIError(err.status, str(err), param=err.param, code=err.code) from None

    def _bytes_limit(self, data: bytes, what: str, param: str) -> bytes:
        limit = self.settings.max_upload_mb * 2**20
        if len(data) > limit:  # MB = 2^20 bytes here and in every upload limit
            raise APIError(
                413,
                f"{what} is {len(data) / 2**20:.2f} MB: at most {self.settings.max_upload_mb:g} MB",
                param=param,
                code="file_too_large",
            )
        if not data:
            raise APIError(400, f"{what} is empty", param=param)
        return data

    def _format(self, fmt: str) -> None:
        if fmt not in formats.available_formats():
            raise APIError(
                400,
                f"response_format {fmt!r} needs an encoder this server lacks; available: "
                f"{list(formats.available_formats())}",
                param="response_format",
            )

    async def _ensure_library(self) -> None:
        """Encode the deployment's shipped voices into the store, once (lazily: the speech
        model must be up to DAC-encode them)."""
        if self._library_ready:
            return
        async with self._library_lock:
            if self._library_ready:
                return
            await ship_voices(self.store, self.settings, self.speech.encode_voice.remote)
            self._library_ready = True

    async def _events(self, handle: DeploymentHandle, job: AudioJob, stream: bool):
        """Start a generation; return (first event, the generator). Errors before the first
        event become HTTP errors here, before any response header is sent."""
        gen = None
        try:
            gen = handle.options(stream=True).generate.remote(job, stream)
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the model returned no audio") from None
        except Exception as err:
            if gen is not None:
                try:
                    gen.cancel()
                except Exception:  # a request Serve refused (backpressure) has nothing to cancel
                    pass
            raise self._model_error(err) from None
        return first, gen

    def _model_error(self, err: BaseException) -> APIError:
        cause = _cause(err)
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if isinstance(err, BackPressureError) or isinstance(cause, BackPressureError):
            return APIError(
                503,
                "the server is at capacity (queue full): retry after the Retry-After delay",
                code="server_overloaded",
                headers=retry,
            )
        if type(cause).__name__ == "ModelBusyError":
            return APIError(
                429,
                "all decode slots are busy and the waiting queue is full: retry later",
                code="rate_limit_exceeded",
                headers=retry,
            )
        if isinstance(cause, TimeoutError):  # the engine's deadline (GenerationTimeout): our own message
            return APIError(
                504, f"{cause}: ask for shorter audio or retry when the server is less busy", code="timeout"
            )
        if isinstance(cause, ValueError) and not isinstance(cause, RayError):
            return APIError(400, str(cause))
        if isinstance(err, (ActorDiedError, ActorUnavailableError)) or isinstance(
            cause, (ActorDiedError, ActorUnavailableError)
        ):
            e = _internal_error(err, 503, "the model replica went away mid-request")
            e.headers = retry
            return e
        return _internal_error(err, 500, "the generation failed")

    async def _respond(
        self, handle, job: AudioJob, *, fmt: str, speed: float, incremental: bool, sse: bool, prefix: str
    ) -> Response:
        first, gen = await self._events(handle, job, incremental)
        if not incremental:
            wav, done = [], None
            event = first
            try:
                while True:
                    if event["type"] == "audio":
                        wav.append(event["wav"])
                    else:
                        done = event
                    try:
                        event = await gen.__anext__()
                    except StopAsyncIteration:
                        break
            except Exception as err:
                raise self._model_error(err) from None
            audio = np.concatenate(wav) if wav else np.zeros(0, np.float32)
            audio = await asyncio.to_thread(formats.change_speed, audio, speed)
            body = await asyncio.to_thread(formats.encode, audio, fmt)
            return Response(body, media_type=formats.CONTENT_TYPES[fmt], headers=_usage_headers(done, len(audio)))

        async def stream():
            event = first
            header_sent = False
            try:
                while True:
                    if event["type"] == "audio":
                        data = formats.pcm16(event["wav"])
                        if fmt == "wav" and not header_sent:
                            data = formats.wav_stream_header() + data
                            header_sent = True
                        if sse:
                            yield _sse({"type": f"{prefix}.audio.delta", "audio": base64.b64encode(data).decode()})
                        else:
                            yield data
                    elif sse:
                        yield _sse({"type": f"{prefix}.audio.done", "usage": _usage(event, job)})
                    try:
                        event = await gen.__anext__()
                    except StopAsyncIteration:
                        return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # Headers are sent: the status cannot change. SSE ends with an error event (and
                # no *.audio.done); a raw wav/pcm stream is cut without its chunked-encoding end,
                # which HTTP clients report as an incomplete body (docs: README "Serving").
                if not sse:
                    raise
                e = self._model_error(err)
                yield _sse({"type": "error", "error": {"message": e.message, "type": e.type, "code": e.code}})
            finally:
                gen.cancel()  # a client that went away cancels its engine row

        media = "text/event-stream" if sse else formats.CONTENT_TYPES[fmt]
        return StreamingResponse(stream(), media_type=media, headers={"Cache-Control": "no-cache"})

    # ---- routes ----

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def index(self):
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        now = int(time.time())
        data = [
            {"id": m, "object": "model", "created": now, "owned_by": "unimoe_ray"} for m in (MODEL_ID, *MODEL_ALIASES)
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/status")
    async def status(self, request: Request):
        self._auth(request)
        speech, music = await asyncio.gather(self.speech.info.remote(), self.music.info.remote())
        return {
            "speech": speech["status"],
            "music": music["status"],
            "speech_model": speech["model"],
            "music_model": music["model"],
            "formats": list(formats.available_formats()),
        }

    @app.post(
        "/v1/audio/speech",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {  # the body is parsed by hand
                    "application/json": {"schema": SpeechRequest.model_json_schema()}
                },
            }
        },
    )
    async def speech_endpoint(self, request: Request):
        caller = self._auth(request, counted=True)
        r: SpeechRequest = await self._json(request, SpeechRequest)
        self._check_model(r.model)
        s = self.settings
        if not r.input.strip():
            raise APIError(400, "input is empty: give the text to speak", param="input")
        if len(r.input) > s.max_input_chars:
            raise APIError(400, f"input is {len(r.input)} characters: at most {s.max_input_chars}", param="input")
        self._format(r.response_format)
        max_seconds = r.max_seconds or s.speech_default_seconds
        if max_seconds > s.speech_max_seconds:
            raise APIError(400, f"max_seconds={max_seconds}: at most {s.speech_max_seconds}", param="max_seconds")
        sse = r.stream_format == "sse"
        incremental = sse or (r.response_format in formats.STREAMABLE and r.speed == 1.0)
        if sse and (r.response_format not in formats.STREAMABLE or r.speed != 1.0):
            raise APIError(
                400,
                f"stream_format 'sse' sends audio as it is generated: it needs response_format "
                f"wav or pcm and speed 1.0 (got {r.response_format!r}, speed {r.speed})",
                param="stream_format",
            )
        voice_codes = voice_text = voice_audio = None
        if r.reference_audio is not None:
            if r.voice:
                raise APIError(400, "give voice or reference_audio, not both", param="reference_audio")
            try:
                voice_audio = base64.b64decode(r.reference_audio, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "reference_audio is not valid base64", param="reference_audio") from None
            self._bytes_limit(voice_audio, "reference_audio", "reference_audio")
            if not (r.reference_text or "").strip():
                raise APIError(400, "reference_audio needs reference_text (its transcript)", param="reference_text")
            if len(r.reference_text) > s.max_input_chars:
                raise APIError(
                    400,
                    f"reference_text is {len(r.reference_text)} characters: at most {s.max_input_chars}",
                    param="reference_text",
                )
            voice_text = r.reference_text
        elif r.voice:
            await self._ensure_library()
            try:
                v, codes = self.store.get(r.voice, owner=caller or ANONYMOUS)
            except VoiceStoreError as err:
                raise APIError(400, str(err), param="voice", code="voice_not_found") from None
            voice_codes, voice_text = codes.numpy().astype(np.int16), v.ref_text
        try:
            sampling = sampling_overrides(**r.model_dump(include=set(Sampling.model_fields)))
        except ValueError as err:
            raise APIError(400, str(err)) from None
        if voice_audio is not None:
            # Encoded as an uploaded voice is, under the same caps (max_voice_seconds, header checks).
            try:
                codes = await self.speech.encode_voice.remote(voice_audio, s.max_voice_seconds)
            except Exception as err:
                raise self._model_error(err) from None
            voice_codes = np.asarray(codes, dtype=np.int16)
        job = AudioJob(
            task="speech",
            text=r.input,
            sampling=sampling,
            max_seconds=max_seconds,
            voice_codes=voice_codes,
            voice_text=voice_text,
        )
        return await self._respond(
            self.speech, job, fmt=r.response_format, speed=r.speed, incremental=incremental, sse=sse, prefix="speech"
        )

    @app.post(
        "/v1/audio/music",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": MusicRequest.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            **MusicRequest.model_json_schema(),
                            "properties": {
                                **MusicRequest.model_json_schema()["properties"],
                                "video": {"type": "string", "format": "binary"},
                            },
                        }
                    },
                },
            }
        },
    )
    async def music_endpoint(self, request: Request):
        self._auth(request, counted=True)
        video = None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await self._form(request, "video")
            if "video" in form.files:
                video = self._bytes_limit(form.files["video"].data, "the video", "video")
            try:
                r = MusicRequest.model_validate(form.fields)
            except ValidationError as err:
                raise validation_error(err) from None
        else:
            r = await self._json(request, MusicRequest)
        self._check_model(r.model)
        s = self.settings
        if not r.prompt.strip():
            raise APIError(400, "prompt is empty: describe the music", param="prompt")
        if len(r.prompt) > s.max_input_chars:
            raise APIError(400, f"prompt is {len(r.prompt)} characters: at most {s.max_input_chars}", param="prompt")
        duration = r.duration if r.duration is not None else s.music_default_seconds
        if duration > s.music_max_seconds:
            raise APIError(400, f"duration={duration}: at most {s.music_max_seconds} seconds", param="duration")
        self._format(r.response_format)
        sse = r.stream_format == "sse"
        incremental = r.stream or sse
        if incremental and r.response_format not in formats.STREAMABLE:
            raise APIError(
                400, f"streaming needs response_format wav or pcm (got {r.response_format!r})", param="response_format"
            )
        try:
            sampling = sampling_overrides(**r.model_dump(include=set(Sampling.model_fields)))
        except ValueError as err:
            raise APIError(400, str(err)) from None
        job = AudioJob(
            task="music",
            text=r.prompt,
            sampling=sampling,
            max_seconds=duration,
            exact_seconds=r.duration is not None,
            video=video,
        )
        return await self._respond(
            self.music, job, fmt=r.response_format, speed=1.0, incremental=incremental, sse=sse, prefix="music"
        )

    @app.post(
        "/v1/audio/voices",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["audio_sample", "name", "ref_text"],
                            "properties": {
                                "audio_sample": {"type": "string", "format": "binary"},
                                "name": {"type": "string"},
                                "ref_text": {"type": "string"},
                            },
                        }
                    }
                },
            }
        },
    )
    async def add_voice(self, request: Request):
        owner = self._auth(request, counted=True) or ANONYMOUS
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "upload a voice as multipart/form-data: audio_sample (file), name, ref_text")
        s = self.settings
        form = await self._form(request, "audio_sample")
        sample, name, ref_text = form.files.get("audio_sample"), form.fields.get("name"), form.fields.get("ref_text")
        if sample is None:
            raise APIError(400, "audio_sample (a file field) is required", param="audio_sample")
        if not name:
            raise APIError(400, "name is required", param="name")
        if not ref_text or not ref_text.strip():
            raise APIError(400, "ref_text (the transcript of the audio sample) is required", param="ref_text")
        if len(ref_text) > s.max_input_chars:
            raise APIError(
                400, f"ref_text is {len(ref_text)} characters: at most {s.max_input_chars}", param="ref_text"
            )
        data = self._bytes_limit(sample.data, "audio_sample", "audio_sample")
        await self._ensure_library()
        try:  # the name and the voice cap before the DAC encode (add checks them again)
            self.store.check_can_add(name, owner=owner)
        except VoiceStoreError as err:
            raise APIError(err.status, str(err), param="name") from None
        try:
            codes = await self.speech.encode_voice.remote(data, self.settings.max_voice_seconds)
        except Exception as err:
            raise self._model_error(err) from None
        try:
            v = self.store.add(name, ref_text, codes_tensor(codes), owner=owner)
        except VoiceStoreError as err:
            raise APIError(err.status, str(err), param="name") from None
        return {
            "success": True,
            "id": v.id,
            "name": v.name,
            "voice": {**v.public(), "mime_type": sample.content_type, "file_size": len(data)},
        }

    @app.get("/v1/audio/voices")
    async def list_voices(self, request: Request):
        owner = self._auth(request) or ANONYMOUS
        await self._ensure_library()
        voices = self.store.list(owner=owner)
        return {"voices": [v.name for v in voices], "data": [v.public() for v in voices]}

    @app.get("/v1/audio/voices/{name}")
    async def get_voice(self, name: str, request: Request):
        owner = self._auth(request) or ANONYMOUS
        await self._ensure_library()
        v = self.store.find(name, owner=owner)  # another key's voice: 404, as if it did not exist
        if v is None:
            raise APIError(404, f"voice {name!r} not found", param="name", code="voice_not_found")
        return v.public()

    @app.delete("/v1/audio/voices/{name}")
    async def delete_voice(self, name: str, request: Request):
        owner = self._auth(request) or ANONYMOUS
        try:
            v = self.store.delete(name, owner=owner)
        except VoiceStoreError as err:
            raise APIError(err.status, str(err), param="name") from None
        return {"success": True, "message": f"Voice {v.name!r} deleted successfully", "id": v.id}


def build_app(args: dict | None = None):
    """The Serve application: ingress + speech and music model deployments. `args` (from a
    serve config's `args:`) may give default user_configs: {"ingress": {...}, "speech": {...},
    "music": {...}}; a config's `deployments:` entries override them (and reconfigure live)."""
    args = dict(args or {})
    unknown = sorted(set(args) - {"ingress", "speech", "music"})
    if unknown:
        raise SettingsError(f"app args: unknown keys {unknown}; use ingress, speech, music")
    speech = AudioModel.options(name="SpeechModel", user_config=args.get("speech") or {}).bind("SpeechModel")
    music = AudioModel.options(name="MusicModel", user_config=args.get("music") or {}).bind("MusicModel")
    return APIIngress.options(user_config=args.get("ingress") or {}).bind(speech, music)
