"""The ingress's settings: its `user_config` (serve_configs/*.yaml, `reconfigure` applies them
live). The model deployments' settings are `serve/runtime.py`'s ModelSettings."""

from __future__ import annotations

from dataclasses import dataclass

from unimoe_ray.serve.runtime import settings_from_dict


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
