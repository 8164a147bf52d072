"""The decode engine's loop thread: runs DecodeEngine steps in the background for a server,
dispatches each request's outputs to its callback, and answers the liveness check (a dead
thread, broken slot accounting, or a step that never ends)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from unimoe_ray.inference.engine import DecodeEngine, EngineInvariantError, EngineOutput, EngineRequest


class EngineLoop:
    """Runs a DecodeEngine's steps on a background thread and hands each request's outputs to
    the callback given at submit (called on that thread). The serving layer bridges the
    callbacks to its event loop, and asks `health()` for its liveness check."""

    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self._callbacks: dict[int, Callable[[EngineOutput], None]] = {}
        self._registry = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.last_progress = time.monotonic()  # the last finished step, or the last idle check
        self.broken: str | None = None  # set when the slot accounting was found inconsistent
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self._thread.start()

    def submit(self, req: EngineRequest, callback: Callable[[EngineOutput], None]) -> int:
        with self._registry:  # the loop dispatches under this lock: it finds the callback
            rid = self.engine.submit(req)
            self._callbacks[rid] = callback
        self._wake.set()
        return rid

    def cancel(self, rid: int) -> None:
        self.engine.cancel(rid)
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def health(self, stall_s: float) -> str | None:
        """None when live; else why not: the loop thread died, the slot accounting broke, or
        the engine has work and finished no step for `stall_s` seconds (a wedged step)."""
        if not self._thread.is_alive():
            return "the decode engine thread is not running"
        if self.broken:
            return self.broken
        idle_for = time.monotonic() - self.last_progress
        if self.engine.has_work() and idle_for > stall_s:
            e = self.engine
            return (
                f"the decode engine made no step for {idle_for:.0f} s with {e.num_running} running and "
                f"{e.num_waiting} waiting requests (stall limit {stall_s:g} s)"
            )
        return None

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self.last_progress = time.monotonic()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.engine.check_invariants()  # before (a corrupt batch would read stale rows) and after
                outputs = self.engine.step()
                self.engine.check_invariants()
            except EngineInvariantError as err:
                self.broken = str(err)  # the liveness check reports it: Serve replaces the replica
                outputs = self.engine.fail_all("internal error: the decode engine was reset")
            except Exception as err:  # a step failing outside any one row: fail the running requests, keep the loop
                outputs = self.engine.fail_all(f"the decode step failed: {type(err).__name__}")
            self.last_progress = time.monotonic()
            for out in outputs:
                with self._registry:
                    cb = self._callbacks.pop(out.request_id, None) if out.done else self._callbacks.get(out.request_id)
                if cb is not None:
                    try:
                        cb(out)
                    except Exception:
                        pass  # a consumer that went away must not stop the engine
