"""The deployments' settings: the ingress's and the model replicas' `user_config`
(serve_configs/*.yaml; `reconfigure` applies them, a model replica reloads only when a field of
`ModelSettings.model_key` changes)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from unimoe_ray.model.quantize import EXPERT_DTYPES


class SettingsError(ValueError):
    pass


def settings_from_dict(cls, data: dict | None, what: str):
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"{what}: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """A model replica's `user_config`. Paths are local (no downloads); with checkpoint,
    tokenizer or dac_path unset, random-weight artifacts of `preset` are generated once under
    `artifacts_dir` (the same save/load code as real weights) — the fresh-clone default."""

    checkpoint: str | None = None
    tokenizer: str | None = None
    dac_path: str | None = None
    preset: str = "tiny"
    artifacts_dir: str = "outputs/serve_artifacts"
    device: str = "cpu"
    dtype: str | None = None
    expert_dtype: str | None = None  # "fp32" | "bf16" | "int8" expert weights (None: as loaded)
    max_rows: int = 16  # KV slots: a guided request uses 2 (cond + uncond)
    max_len: int = 1400  # KV columns per row: prompt + frames + 19
    max_waiting: int = 32  # requests waiting for a slot before 429
    first_chunk_frames: int = 5
    chunk_frames: int = 25
    torch_threads: int | None = None
    request_timeout_s: float = 240.0  # a request's deadline in the engine (queued + decoding): then 504
    stall_timeout_s: float = 120.0  # the liveness check fails when the engine has work and no step ends for this long
    experts_group: str | None = None  # attach to this expert-actor group (None: in-process experts)
    experts_namespace: str | None = None
    experts_exchange: str | None = None  # "compiled" | "plain" (None: ExpertParallelConfig's default)

    def __post_init__(self) -> None:
        if self.expert_dtype is not None and self.expert_dtype not in EXPERT_DTYPES:
            raise SettingsError(
                f"expert_dtype={self.expert_dtype!r}: use {', '.join(EXPERT_DTYPES)} (or leave it unset)"
            )
        for name in ("max_rows", "max_len", "max_waiting", "first_chunk_frames", "chunk_frames"):
            if int(getattr(self, name)) < 1:
                raise SettingsError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("request_timeout_s", "stall_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise SettingsError(f"{name}={getattr(self, name)}: must be > 0 seconds")

    @classmethod
    def from_dict(cls, data: dict | None) -> "ModelSettings":
        return settings_from_dict(cls, data, "model user_config")

    def model_key(self) -> tuple:
        """The fields whose change needs a reload (the rest apply live)."""
        return (
            self.checkpoint,
            self.tokenizer,
            self.dac_path,
            self.preset,
            self.artifacts_dir,
            self.device,
            self.dtype,
            self.expert_dtype,
            self.max_rows,
            self.max_len,
            self.experts_group,
            self.experts_namespace,
            self.experts_exchange,
        )


@dataclass(frozen=True, kw_only=True)
class IngressSettings:
    """The ingress's `user_config` (changes apply live)."""

    max_input_chars: int = 4096
    speech_max_seconds: float = 20.0  # the most a speech request may ask for (max_seconds)
    speech_default_seconds: float = 10.0
    music_max_seconds: float = 30.0
    music_default_seconds: float = 10.0
    max_upload_mb: float = 10.0  # voice samples, inline reference audio, videos
    max_voice_seconds: float = 30.0
    max_voices: int = 100
    voices_dir: str = "outputs/serve_voices"
    voice_library: str | None = None  # a prompt_audios.json-style file shipped with the deployment
    voice_root: str | None = None
    ship_default_voice: bool = True  # with no library: one generated voice named "default"
    api_keys_env: str | None = "UNIMOE_API_KEYS"  # comma-separated keys in this env variable
    api_keys_file: str | None = None  # one key per line
    retry_after_s: int = 2
    # Per-API-key limits (serve/auth.py; per ingress replica; none with auth off; null: that limit off):
    rate_limit_per_minute: float | None = 120.0  # token bucket refill
    rate_limit_burst: int = 20  # requests a key may send at once before the rate paces it
    max_concurrent_per_key: int | None = 4  # speech/music/voice uploads in flight (a stream until it ends)

    @classmethod
    def from_dict(cls, data: dict | None) -> "IngressSettings":
        return settings_from_dict(cls, data, "ingress user_config")
