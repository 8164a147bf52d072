"""The API's request bodies (pydantic models: OpenAI's audio contract where one exists, plus the
sampling extensions) and its error shape, OpenAI's {"error": {"message", "type", "param",
"code"}}."""

# No `from __future__ import annotations`: pydantic and FastAPI read the real field types.

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MODEL_ID = "unimoe-audio"
# OpenAI's TTS model names, accepted so that clients written for OpenAI run unchanged.
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


class APIError(Exception):
    """An HTTP error the API answers in OpenAI's shape (`response()`); `type` follows the status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            409: "conflict_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "server_overloaded",
        }.get(status, "server_error")
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Sampling(BaseModel):
    """Sampling extensions shared by speech and music (None: the task's released default)."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    temperature: float | None = Field(None, ge=0, le=5)  # 0: greedy
    top_k: int | None = Field(None, ge=1, le=1024)
    top_p: float | None = Field(None, gt=0, le=1)


class SpeechRequest(Sampling):
    model: str = MODEL_ID
    input: str
    voice: str | None = None
    response_format: Literal["wav", "flac", "pcm", "mp3", "opus"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    max_seconds: float | None = Field(None, gt=0)
    reference_audio: str | None = None  # base64 audio bytes (any format libsndfile reads)
    reference_text: str | None = None


class MusicRequest(Sampling):
    model: str = MODEL_ID
    prompt: str
    duration: float | None = Field(None, gt=0)
    response_format: Literal["wav", "flac", "pcm", "mp3", "opus"] = "wav"
    stream: bool = False
    stream_format: Literal["audio", "sse"] = "audio"


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 in the API's error shape."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown parameter {param!r}"
    elif first.get("type") == "literal_error":
        msg = f"{param}: {msg}"
    else:
        msg = f"{param}: {msg}"
    return APIError(400, msg, param=param, code="invalid_value")
