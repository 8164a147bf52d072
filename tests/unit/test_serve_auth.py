"""API keys that fail closed and reload on change, per-key limits (token bucket maths on an
injected clock, in-flight places released when a response or a stream ends), and voices owned
by the key that uploaded them (serve/auth.py, serve/voices.py), and the ingress's
reconfigure refusing a bad key file (called as a plain method: no Ray running)."""

import asyncio
import hashlib
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from safetensors import safe_open
from safetensors.torch import save_file

from unimoe_ray.serve.auth import (
    CallerLimits,
    KeyRing,
    LimitExceeded,
    LimitPolicy,
    ResponseEndMiddleware,
    key_owner,
    on_response_end,
)
from unimoe_ray.serve.settings import SettingsError
from unimoe_ray.serve.voices import ANONYMOUS, VoiceStore, VoiceStoreError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _write(path, text: str, tick: int) -> None:
    """Write `text` with a distinct mtime (the reload check compares mtime, size and inode)."""
    path.write_text(text)
    os.utime(path, ns=(tick * 10**9, tick * 10**9))


# ---- KeyRing ----


def test_a_bad_key_file_is_an_error_at_build_never_auth_off(tmp_path):
    with pytest.raises(SettingsError, match=f"api_keys_file {tmp_path / 'nope.txt'} does not exist: create it"):
        KeyRing(file=tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# keys go here\n\n   \n")
    with pytest.raises(SettingsError, match=f"api_keys_file {empty} holds no key.*not read as 'auth off'"):
        KeyRing(file=empty)
    with pytest.raises(SettingsError, match=f"api_keys_file {tmp_path} cannot be read \\(IsADirectoryError"):
        KeyRing(file=tmp_path)
    binary = tmp_path / "keys.bin"
    binary.write_bytes(b"\xff\xfe\x00key")
    with pytest.raises(SettingsError, match=f"api_keys_file {binary} cannot be read \\(UnicodeDecodeError"):
        KeyRing(file=binary)


def test_sources_and_when_auth_is_off(tmp_path):
    off = KeyRing.from_settings(api_keys_env="KEYS", api_keys_file=None, environ={})
    assert not off.enabled  # variable unset, no file: auth off, the local default
    assert not KeyRing.from_settings(api_keys_env="KEYS", api_keys_file=None, environ={"KEYS": " "}).enabled
    assert not KeyRing.from_settings(api_keys_env=None, api_keys_file=None, environ={"KEYS": "a"}).enabled
    with pytest.raises(SettingsError, match="KEYS \\(api_keys_env\\) is set but holds no key"):
        KeyRing.from_settings(api_keys_env="KEYS", api_keys_file=None, environ={"KEYS": " , ,"})
    env = KeyRing.from_settings(api_keys_env="KEYS", api_keys_file=None, environ={"KEYS": "alpha, beta ,"})
    assert env.enabled and len(env) == 2
    assert env.identify("alpha") == hashlib.sha256(b"alpha").hexdigest()[:16] == key_owner("alpha")
    assert env.identify("beta") == key_owner("beta") != key_owner("alpha")
    assert env.identify("gamma") is None and env.identify("") is None and env.identify("alpha ") is None
    keys = tmp_path / "keys.txt"
    keys.write_text("# ops team\nfile-key\n  spaced-key  \n")
    both = KeyRing.from_settings(api_keys_env="KEYS", api_keys_file=str(keys), environ={"KEYS": "alpha"})
    assert len(both) == 3 and both.identify("spaced-key") == key_owner("spaced-key")
    assert both.identify("# ops team") is None  # a comment is not a key


def test_key_file_reloads_on_change_and_keeps_the_last_good_keys(tmp_path, caplog):
    clock = Clock()
    keys = tmp_path / "keys.txt"
    _write(keys, "old-key\n", tick=1)
    ring = KeyRing(env_keys=frozenset(), file=keys, clock=clock, recheck_s=1.0)
    assert ring.identify("old-key") == key_owner("old-key")
    _write(keys, "new-key-1\nnew-key-2\n", tick=2)
    clock.t += 0.5  # checked at most once a second: not yet
    assert ring.identify("old-key") is not None and ring.identify("new-key-1") is None
    clock.t += 0.5
    assert ring.identify("new-key-1") == key_owner("new-key-1")  # no redeploy
    assert ring.identify("old-key") is None  # the removed key is refused
    with caplog.at_level(logging.WARNING, logger="unimoe_ray.serve.auth"):
        _write(keys, "# all gone\n", tick=3)  # an editor's half-written save
        clock.t += 1.0
        assert ring.identify("new-key-2") == key_owner("new-key-2")  # kept, not "auth off"
        assert ring.identify("anything") is None
        clock.t += 1.0
        ring.identify("new-key-2")  # unchanged since: no second warning
        keys.unlink()
        clock.t += 1.0
        assert ring.identify("new-key-1") is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "holds no key" in warnings[0] and "Keeping the 2 keys" in warnings[0]
    assert "does not exist" in warnings[1]
    _write(keys, "fixed-key\n", tick=4)
    clock.t += 1.0
    assert ring.identify("fixed-key") is not None and ring.identify("new-key-1") is None


def test_env_keys_survive_a_file_reload(tmp_path):
    clock = Clock()
    keys = tmp_path / "keys.txt"
    _write(keys, "file-a\n", tick=1)
    ring = KeyRing.from_settings(api_keys_env="K", api_keys_file=str(keys), environ={"K": "env-key"}, clock=clock)
    _write(keys, "file-bb\n", tick=2)
    clock.t += 1.0
    assert ring.identify("file-bb") and ring.identify("env-key") and ring.identify("file-a") is None


def test_the_ingress_fails_closed_on_a_bad_key_file_and_keeps_its_state(tmp_path):
    from unimoe_ray.serve.app import APIIngress
    from unimoe_ray.serve.settings import IngressSettings

    reconfigure = APIIngress.func_or_class.reconfigure  # the class Serve wraps; Ray is not needed
    ingress = SimpleNamespace(
        settings=IngressSettings(), keyring=KeyRing(), limits=CallerLimits(), _library_ready=True, store=None
    )
    keys = tmp_path / "keys.txt"
    keys.write_text("good-key\n")
    config = {
        "voices_dir": str(tmp_path / "voices"),
        "api_keys_env": None,
        "api_keys_file": str(keys),
        "max_concurrent_per_key": 2,
        "rate_limit_per_minute": None,
    }
    reconfigure(ingress, config)
    assert ingress.keyring.enabled and ingress.keyring.identify("good-key") == key_owner("good-key")
    assert ingress.limits.policy == LimitPolicy(per_minute=None, burst=20, max_in_flight=2, retry_after_s=2)
    before = (ingress.settings, ingress.keyring, ingress.limits.policy)
    keys.write_text("# emptied by mistake\n")
    with pytest.raises(SettingsError, match=f"api_keys_file {keys} holds no key"):
        reconfigure(ingress, {**config, "max_input_chars": 10})
    with pytest.raises(SettingsError, match="max_concurrent_per_key=0"):
        reconfigure(ingress, {**config, "api_keys_file": None, "max_concurrent_per_key": 0})
    assert (ingress.settings, ingress.keyring, ingress.limits.policy) == before  # nothing half-applied


# ---- limits ----


def test_token_bucket_refill_maths():
    clock = Clock()
    limits = CallerLimits(LimitPolicy(per_minute=120, burst=3, max_in_flight=None), clock=clock)
    for _ in range(3):  # the burst: 3 at once
        assert limits.admit("a", counted=False) is None
    with pytest.raises(LimitExceeded, match="120 requests per minute \\(burst 3\\)") as err:
        limits.admit("a", counted=False)
    assert err.value.retry_after_s == 1  # 0 tokens, 2 per second: one back in 0.5 s, rounded up
    limits.admit("b", counted=False)  # buckets are per key
    clock.t += 0.5
    limits.admit("a", counted=False)  # the token that came back
    with pytest.raises(LimitExceeded):
        limits.admit("a", counted=False)
    clock.t += 1000.0  # refilled to the burst, not beyond
    for _ in range(3):
        limits.admit("a", counted=False)
    with pytest.raises(LimitExceeded):
        limits.admit("a", counted=False)

    slow = CallerLimits(LimitPolicy(per_minute=6, burst=1, max_in_flight=None), clock=clock)
    slow.admit("a", counted=False)
    clock.t += 4.0  # 0.1 token/s: 0.4 tokens, 0.6 missing → 6 s
    with pytest.raises(LimitExceeded) as err:
        slow.admit("a", counted=False)
    assert err.value.retry_after_s == 6
    clock.t += 5.9  # 0.99 tokens: still 1 s to wait (never "Retry-After: 0")
    with pytest.raises(LimitExceeded) as err:
        slow.admit("a", counted=False)
    assert err.value.retry_after_s == 1
    clock.t += 0.1
    slow.admit("a", counted=False)


def test_in_flight_places_are_released_once_and_refusals_take_nothing():
    clock = Clock()
    limits = CallerLimits(LimitPolicy(per_minute=60, burst=3, max_in_flight=2, retry_after_s=7), clock=clock)
    first, second = limits.admit("a", counted=True), limits.admit("a", counted=True)
    assert limits.in_flight("a") == 2
    with pytest.raises(LimitExceeded, match="already has 2 requests in flight") as err:
        limits.admit("a", counted=True)
    assert err.value.retry_after_s == 7
    limits.admit("a", counted=False)  # the refusal took no token: the third one is still there
    with pytest.raises(LimitExceeded, match="requests per minute"):
        limits.admit("a", counted=False)
    first()
    first()  # a second call does nothing
    assert limits.in_flight("a") == 1
    limits.apply(LimitPolicy(per_minute=60, burst=3, max_in_flight=1))  # live: the count carries over
    clock.t += 10.0
    with pytest.raises(LimitExceeded, match="already has 1 requests"):
        limits.admit("a", counted=True)
    second()
    assert limits.in_flight("a") == 0
    limits.admit("a", counted=True)
    unlimited = CallerLimits(LimitPolicy(per_minute=None, max_in_flight=None), clock=clock)
    for _ in range(1000):
        unlimited.admit("a", counted=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"per_minute": 0}, "rate_limit_per_minute=0: must be > 0"),
        ({"burst": 0}, "rate_limit_burst=0"),
        ({"burst": 2.5}, "rate_limit_burst=2.5"),
        ({"max_in_flight": 0}, "max_concurrent_per_key=0"),
        ({"retry_after_s": 0}, "retry_after_s=0"),
    ],
)
def test_limit_policy_refuses_bad_values(kwargs, match):
    with pytest.raises(SettingsError, match=match):
        LimitPolicy(**kwargs)


def _limited_app(limits: CallerLimits, seen: dict) -> FastAPI:
    app = FastAPI()
    app.add_middleware(ResponseEndMiddleware)

    def take(request: Request) -> None:
        release = limits.admit("a", counted=True)
        on_response_end(request.scope, release)

    @app.get("/stream")
    async def stream(request: Request):
        take(request)

        async def chunks():
            try:
                for i in range(10**6):  # ends only when the client leaves
                    seen["in_flight_while_streaming"] = limits.in_flight("a")
                    yield b"x" * 10
                    await asyncio.sleep(0)
            finally:
                seen["generator_closed_at_in_flight"] = limits.in_flight("a")

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.get("/short")
    async def short(request: Request):
        take(request)

        async def chunks():
            for _ in range(3):
                seen["in_flight_while_streaming"] = limits.in_flight("a")
                yield b"abc"

        return StreamingResponse(chunks())

    @app.get("/fails")
    async def fails(request: Request):
        take(request)
        raise HTTPException(418, "no")

    return app


async def _call(app, path: str, *, leave_after_first_chunk: bool) -> list[dict]:
    """Drive the ASGI app directly; the client 'leaves' (http.disconnect) after the first
    body chunk when asked."""
    sent: list[dict] = []
    first_chunk = asyncio.Event()
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if leave_after_first_chunk:
            await first_chunk.wait()
        else:
            await asyncio.Event().wait()  # never: the response ends by itself
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=60)
    return sent


def test_a_stream_holds_its_place_until_it_ends_or_the_client_leaves():
    limits = CallerLimits(LimitPolicy(per_minute=None, max_in_flight=1))
    seen: dict = {}
    app = _limited_app(limits, seen)
    sent = asyncio.run(_call(app, "/short", leave_after_first_chunk=False))
    assert sent[0]["status"] == 200 and b"".join(m.get("body", b"") for m in sent[1:]) == b"abc" * 3
    assert seen["in_flight_while_streaming"] == 1 and limits.in_flight("a") == 0
    seen.clear()
    asyncio.run(_call(app, "/stream", leave_after_first_chunk=True))
    # The generator was closed by the disconnect while the place was still held; then freed.
    assert seen["in_flight_while_streaming"] == 1 and seen["generator_closed_at_in_flight"] == 1
    assert limits.in_flight("a") == 0
    sent = asyncio.run(_call(app, "/fails", leave_after_first_chunk=False))
    assert sent[0]["status"] == 418 and limits.in_flight("a") == 0  # an error response frees it too


def test_on_response_end_without_the_middleware_says_so():
    with pytest.raises(RuntimeError, match="needs ResponseEndMiddleware"):
        on_response_end({"type": "http"}, lambda: None)


# ---- voice ownership ----

CODES = torch.randint(0, 1024, (12, 30))
A, B = key_owner("key-a"), key_owner("key-b")


def test_voices_belong_to_their_uploader(tmp_path):
    store = VoiceStore(tmp_path, max_voices=5)
    lib = store.add("default", "Library voice.", CODES, origin="library")
    alice_a = store.add("alice", "I am A's Alice.", CODES, owner=A)
    assert [v.name for v in store.list(owner=A)] == ["default", "alice"]
    assert [v.name for v in store.list(owner=B)] == ["default"]  # library shared, A's upload not
    assert store.find("alice", owner=B) is None and store.find(alice_a.id, owner=B) is None
    with pytest.raises(VoiceStoreError) as err:
        store.get(alice_a.id, owner=B)  # by id too
    assert err.value.status == 404 and "alice" not in str(err.value).replace(alice_a.id, "")
    with pytest.raises(VoiceStoreError) as err:
        store.delete("alice", owner=B)
    assert err.value.status == 404  # not 403: B learns nothing about A's voices
    alice_b = store.add("Alice", "I am B's Alice.", CODES, owner=B)  # names are unique per owner
    assert store.get("alice", owner=A)[0].id == alice_a.id and store.get("alice", owner=B)[0].id == alice_b.id
    with pytest.raises(VoiceStoreError, match="exists") as err:
        store.add("ALICE", "Again.", CODES, owner=A)
    assert err.value.status == 409
    with pytest.raises(VoiceStoreError, match="exists"):
        store.add("Default", "Mine now.", CODES, owner=A)  # library names are global
    for owner in (A, B, ANONYMOUS):
        assert store.get("default", owner=owner)[0].id == lib.id
        with pytest.raises(VoiceStoreError) as err:
            store.delete("default", owner=owner)
        assert err.value.status == 403
    store.delete("alice", owner=B)
    assert store.get("alice", owner=A)[0].id == alice_a.id  # A's is untouched
    assert [v.name for v in store.list(owner=B)] == ["default"]
    with safe_open(str(tmp_path / f"{alice_a.id}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["owner"] == A and "key-a" not in "".join(meta.values())  # a hash, never the key


def test_voice_cap_is_per_owner(tmp_path):
    store = VoiceStore(tmp_path, max_voices=1)
    store.add("one", "First.", CODES, owner=A)
    with pytest.raises(VoiceStoreError, match="voice limit reached \\(1 uploaded voices for this API key\\)"):
        store.add("two", "Second.", CODES, owner=A)
    store.add("one", "B's first.", CODES, owner=B)  # A's uploads do not use up B's
    store.add("lib", "Library voices are not uploads.", CODES, origin="library")


def test_voices_without_an_owner_belong_to_the_anonymous_owner(tmp_path):
    # A voice stored before owners existed: name, ref_text, origin, created_at only.
    save_file(
        {"codes_KT": CODES.to(torch.int16)},
        str(tmp_path / "voice_0123456789abcdef.safetensors"),
        metadata={"name": "narrator", "ref_text": "Old voice.", "origin": "upload", "created_at": "1"},
    )
    store = VoiceStore(tmp_path, max_voices=5)
    v, codes = store.get("narrator", owner=ANONYMOUS)  # what auth-off callers are
    assert v.owner == ANONYMOUS and torch.equal(codes, CODES)
    assert store.find("narrator", owner=A) is None and store.list(owner=A) == []
    store.add("narrator", "A may use the name.", CODES, owner=A)


def test_a_library_voice_added_after_an_upload_of_its_name_shadows_it_by_name_only(tmp_path):
    store = VoiceStore(tmp_path, max_voices=5)
    upload = store.add("narr", "Uploaded first.", CODES, owner=A)
    lib = store.add("narr", "Shipped later.", CODES, origin="library")
    with pytest.raises(VoiceStoreError, match="exists"):
        store.add("narr", "Twice.", CODES, origin="library")  # library names stay unique
    assert store.find("narr", owner=A).id == lib.id and store.find(upload.id, owner=A).id == upload.id
    assert store.delete(upload.id, owner=A).id == upload.id


def test_request_ids_reach_errors_only_as_plain_tokens():
    import asyncio

    from unimoe_ray.serve import app as app_module

    seen = []

    async def inner(scope, receive, send):
        seen.append(app_module._REQUEST_ID.get())

    mw = app_module.RequestIdMiddleware(inner)
    for rid in (b"abc-123_x.y:z", b"forged\nERROR request 1: owned", b"x" * 129, b""):
        asyncio.run(mw({"type": "http", "headers": [(b"x-request-id", rid)]}, None, None))
    assert seen[0] == "abc-123_x.y:z"
    assert all(len(r) == 32 and r.isalnum() for r in seen[1:])  # replaced by a fresh uuid hex
