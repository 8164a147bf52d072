"""Who may call the API, and how much: API keys that fail closed and reload on change, and
per-key limits on request rate and on requests in flight. Plain Python (no Ray, no FastAPI):
the ingress (serve/app.py) builds a `KeyRing` and a `LimitPolicy` at `reconfigure` and asks
them on every request.

Key sources (IngressSettings `api_keys_env`, `api_keys_file`):
- `api_keys_env` names an environment variable of comma-separated keys, read at reconfigure
  (a process's environment does not change under it). Unset or empty: that source is off.
  Set to something that holds no key (only commas and spaces): an error, since someone meant
  to set keys.
- `api_keys_file`: one key per line; blank lines and `#` comments are skipped. Set but missing,
  unreadable or holding no key: `SettingsError` at deploy, never "auth off". While serving, the
  file is re-checked (mtime, size, inode) at most once a second, on a request, and reloaded
  when it changed: a new key works and a removed key is refused within about a second, with no
  redeploy. A file that later becomes empty, unreadable or disappears keeps the last good keys
  (an editor's half-written save must neither lock everyone out nor open the door) and logs a
  warning, once per change.
- Auth is off only when neither source is configured: no `api_keys_file` and `api_keys_env`
  unset (or naming an unset or empty variable) — the local default, as before.

A caller is known by `key_owner(key)`: the first 16 hex digits of the key's SHA-256. That is
the only form in which a key is kept in memory past parsing, stored (voice owners) or logged;
a rotated key is a new owner (its uploads start empty).

Limits (`LimitPolicy`, per ingress replica: with N ingress replicas a key may get up to N
times the figures, as Serve spreads requests over them):
- a token bucket per key: `burst` tokens, refilled at `per_minute / 60` per second; every
  authenticated request takes one; none left → 429 with `Retry-After` = the whole seconds until
  one is back;
- at most `max_in_flight` counted requests per key at a time (the ingress counts the ones that
  generate or encode: speech, music, voice uploads); a counted request holds its place until
  its response has ended, a streamed one until its generator finishes or the client leaves
  (`ResponseEndMiddleware`) → else 429 with `Retry-After` = `retry_after_s`.
With auth off there are no per-caller limits (one client IP is often a whole office or a load
balancer); Serve's queue bound (503) and the engine's waiting queue (429) still apply.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from unimoe_ray.serve.settings import SettingsError

log = logging.getLogger(__name__)

OWNER_HEX_DIGITS = 16
RECHECK_S = 1.0  # how often (at most) a request stats the key file


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_owner(key: str) -> str:
    """The identity a key stands for: a SHA-256 hex prefix (never the key itself)."""
    return _digest(key)[:OWNER_HEX_DIGITS]


def _parse_keys(lines: list[str]) -> frozenset[str]:
    """Digests of the keys in `lines` (stripped; blank lines and `#` comments skipped)."""
    keys = (line.strip() for line in lines)
    return frozenset(_digest(k) for k in keys if k and not k.startswith("#"))


def read_key_file(path: Path) -> frozenset[str]:
    """The key digests in `path`; SettingsError (naming the file and the fix) when it is
    missing, unreadable or holds no key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(
            f"api_keys_file {path} does not exist: create it with one API key per line, or set "
            "api_keys_file: null to take keys from api_keys_env only"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(
            f"api_keys_file {path} cannot be read ({type(err).__name__}: {err}): make it a UTF-8 text "
            "file the Serve replica's user may read"
        ) from None
    digests = _parse_keys(text.splitlines())
    if not digests:
        raise SettingsError(
            f"api_keys_file {path} holds no key (only blank lines or # comments): add one key per "
            "line. An empty key file is refused, not read as 'auth off'; to run without auth set "
            "api_keys_file: null and leave api_keys_env unset"
        )
    return digests


def _file_signature(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError as err:
        return ("unreadable", type(err).__name__)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class KeyRing:
    """The accepted API keys (as digests) from an environment variable and/or a key file;
    see the module docstring for when auth is on and how the file reloads.

    `identify(token)` answers the caller's owner id, or None for a key not on the ring. Thread
    safe: the set in use is swapped whole, a reload holds a lock."""

    def __init__(
        self,
        *,
        env_keys: frozenset[str] = frozenset(),
        file: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.file = Path(file) if file is not None else None
        self._env = frozenset(env_keys)
        self._clock, self._recheck_s = clock, recheck_s
        self._lock = threading.Lock()
        self._file_keys: frozenset[str] = frozenset()
        if self.file is not None:
            self._signature = _file_signature(self.file)
            self._file_keys = read_key_file(self.file)  # at deploy: a bad file is an error
        self._keys = self._env | self._file_keys
        self._next_check = clock() + recheck_s

    @classmethod
    def from_settings(
        cls, *, api_keys_env: str | None, api_keys_file: str | None, environ: dict[str, str] | None = None, **kwargs
    ) -> "KeyRing":
        environ = os.environ if environ is None else environ
        env_keys: frozenset[str] = frozenset()
        raw = environ.get(api_keys_env, "") if api_keys_env else ""
        if raw.strip():
            env_keys = _parse_keys(raw.split(","))
            if not env_keys:
                raise SettingsError(
                    f"the environment variable {api_keys_env} (api_keys_env) is set but holds no key: "
                    "give comma-separated keys, or unset it"
                )
        return cls(env_keys=env_keys, file=api_keys_file, **kwargs)

    @property
    def enabled(self) -> bool:
        """False only with no key source configured (auth off)."""
        return self.file is not None or bool(self._env)

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, token: str) -> str | None:
        self._maybe_reload()
        if not token:
            return None
        digest = _digest(token)
        return digest[:OWNER_HEX_DIGITS] if digest in self._keys else None

    def _maybe_reload(self) -> None:
        if self.file is None or self._clock() < self._next_check:
            return
        with self._lock:
            now = self._clock()
            if now < self._next_check:
                return  # another thread checked meanwhile
            self._next_check = now + self._recheck_s
            signature = _file_signature(self.file)
            if signature == self._signature:
                return
            self._signature = signature
            try:
                file_keys = read_key_file(self.file)
            except SettingsError as err:
                log.warning("%s. Keeping the %d keys loaded before until the file is fixed.", err, len(self._keys))
                return
            self._file_keys = file_keys
            self._keys = self._env | file_keys
            log.info("api_keys_file %s reloaded: %d keys", self.file, len(file_keys))


@dataclass(frozen=True, kw_only=True)
class LimitPolicy:
    """Per-key limits (None: that limit is off). See the module docstring."""

    per_minute: float | None = 120.0
    burst: int = 20
    max_in_flight: int | None = 4
    retry_after_s: int = 2  # Retry-After for the in-flight limit (no bucket says when one ends)

    def __post_init__(self) -> None:
        if self.per_minute is not None and not self.per_minute > 0:
            raise SettingsError(f"rate_limit_per_minute={self.per_minute}: must be > 0 (or null: no rate limit)")
        if int(self.burst) != self.burst or self.burst < 1:
            raise SettingsError(f"rate_limit_burst={self.burst}: must be a whole number >= 1")
        if self.max_in_flight is not None and (int(self.max_in_flight) != self.max_in_flight or self.max_in_flight < 1):
            raise SettingsError(
                f"max_concurrent_per_key={self.max_in_flight}: must be a whole number >= 1 (or null: no limit)"
            )
        if self.retry_after_s < 1:
            raise SettingsError(f"retry_after_s={self.retry_after_s}: must be >= 1")


class LimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CallerLimits:
    """Token buckets and in-flight counts per caller, under one `LimitPolicy`.

    Bucket worked example (per_minute=120 → 2 tokens/s, burst=3): requests at t=0, 0, 0 take
    the 3 tokens; a 4th at t=0 finds 0 tokens and needs 1, i.e. 0.5 s → 429, Retry-After 1; at
    t=0.5 one token is back and a request passes; at t=10 the bucket is full again (3, not 20).

    `apply(policy)` changes the figures live, keeping the counts and bucket levels (a level
    above a smaller burst is cut to it), so a reconfigure neither frees nor forgets streams in
    flight."""

    def __init__(self, policy: LimitPolicy | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or LimitPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # caller → (tokens, at)
        self._in_flight: dict[str, int] = {}

    def apply(self, policy: LimitPolicy) -> None:
        with self._lock:
            self.policy = policy

    def in_flight(self, caller: str) -> int:
        return self._in_flight.get(caller, 0)

    def admit(self, caller: str, *, counted: bool) -> Callable[[], None] | None:
        """Take one token for `caller` and, when `counted`, a place in flight; answer the
        place's release (call it once the response has ended; later calls do nothing), or None
        when not counted. LimitExceeded (with its Retry-After) when a limit is reached: then
        nothing was taken."""
        p = self.policy
        with self._lock:
            if counted and p.max_in_flight is not None and self._in_flight.get(caller, 0) >= p.max_in_flight:
                raise LimitExceeded(
                    f"this API key already has {p.max_in_flight} requests in flight (max_concurrent_per_key): "
                    "wait for one to finish",
                    p.retry_after_s,
                )
            if p.per_minute is not None:
                now = self._clock()
                rate_per_s = p.per_minute / 60.0
                tokens, at = self._buckets.get(caller, (float(p.burst), now))
                tokens = min(float(p.burst), tokens + (now - at) * rate_per_s)
                if tokens < 1.0:
                    self._buckets[caller] = (tokens, now)
                    wait_s = max(1, math.ceil((1.0 - tokens) / rate_per_s - 1e-9))
                    raise LimitExceeded(
                        f"rate limit of {p.per_minute:g} requests per minute (burst {p.burst}) reached for this "
                        f"API key: retry in {wait_s} s",
                        wait_s,
                    )
                self._buckets[caller] = (tokens - 1.0, now)
            if not counted:
                return None
            self._in_flight[caller] = self._in_flight.get(caller, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._in_flight.get(caller, 0) - 1
                if left > 0:
                    self._in_flight[caller] = left
                else:
                    self._in_flight.pop(caller, None)

        return release


_ON_END = "unimoe.on_response_end"  # an ASGI scope key (per request)


def on_response_end(scope: dict, callback: Callable[[], None]) -> None:
    """Run `callback` once the response of the request with this ASGI `scope` has ended
    (needs `ResponseEndMiddleware` around the app)."""
    try:
        scope[_ON_END].append(callback)
    except KeyError:
        raise RuntimeError("on_response_end needs ResponseEndMiddleware in the ASGI app") from None


class ResponseEndMiddleware:
    """Pure ASGI middleware: runs the callbacks a handler registered with `on_response_end`
    after the app has finished with the request — for a StreamingResponse that is after its
    generator finished or was closed (client gone, cancelled): Starlette sends the whole body
    inside the app call, so a `finally` here sees the real end."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        callbacks: list[Callable[[], None]] = []
        scope[_ON_END] = callbacks
        try:
            await self.app(scope, receive, send)
        finally:
            for callback in reversed(callbacks):
                try:
                    callback()
                except Exception:  # one failing callback must not keep the others from running
                    log.exception("a response-end callback failed")
