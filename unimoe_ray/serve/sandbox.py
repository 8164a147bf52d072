"""Run one decoding function on untrusted bytes in a short-lived child process, so that a hostile
file can fail only its own request: the child has an address-space cap (RLIMIT_AS), may write no
files (RLIMIT_FSIZE 0) and no core dump, and is killed past a wall-clock timeout. What it sends
back is a JSON header and plain .npy arrays (read with allow_pickle=False), never a pickle: even a
decoder exploited by the file cannot hand the replica an object to run.

The child is a fresh interpreter (`python -m unimoe_ray.serve.sandbox`), not a fork: a fork of a
replica would copy the decode engine's threads' locks mid-use (torch, OpenMP) and its GBs of
address space; a fresh one imports only numpy and the decoders (no torch, no Ray). That start is
the cost of the isolation: ~130 ms per audio call and ~200 ms per video call (PyAV's import) on
the 2-core test machine, against a few ms for the decode itself.

    result = run_isolated("unimoe_ray.serve.untrusted_media:decode_audio", {"data": b, ...},
                          memory_mb=512, timeout_s=15, what="the audio")

Errors are ValueError with a message for the client (the ingress answers 400): the target's own
ValueError text, "needs more than N MB", "took longer than N s", or "the decoder crashed".
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

_LOG = logging.getLogger(__name__)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding unimoe_ray/
# One thread per library in the child: fewer threads reserve less address space (each glibc
# malloc arena reserves 64 MB of it, which RLIMIT_AS counts) and the start is faster.
_CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "PYTHONDONTWRITEBYTECODE": "1",
}
# Children at once per process: a flood of uploads then costs at most this many memory caps.
MAX_CHILDREN = 4
_CHILDREN = threading.BoundedSemaphore(MAX_CHILDREN)


def run_isolated(
    target: str, kwargs: dict[str, Any], *, memory_mb: float, timeout_s: float, what: str, imports: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Call `target` ("module:function", importable without torch) with `kwargs` in a child.

    Args:
        kwargs: picklable arguments (the parent's own values: the child trusts them).
        memory_mb: address space the call may add to the child once its modules are imported.
        timeout_s: wall-clock limit for the whole child (start included); then it is killed.
        what: names the input in error messages ("the audio sample").
        imports: modules imported before the cap is set (e.g. "av": its libraries' mappings
            would otherwise count against `memory_mb`).

    Returns:
        The target's result: a dict of str → numpy array | int | float | str | bool | None.

    Raises:
        ValueError: the target refused the input, or the child ran out of memory or time, or died.
        TimeoutError: MAX_CHILDREN other decodes kept this one from starting within `timeout_s`.
    """
    if not _CHILDREN.acquire(timeout=timeout_s):
        raise TimeoutError(
            f"the server is decoding {MAX_CHILDREN} other uploads and could not start on {what} within {timeout_s:g} s"
        )
    try:
        return _run_child(target, kwargs, memory_mb=memory_mb, timeout_s=timeout_s, what=what, imports=imports)
    finally:
        _CHILDREN.release()


def _run_child(
    target: str, kwargs: dict[str, Any], *, memory_mb: float, timeout_s: float, what: str, imports: tuple[str, ...]
) -> dict[str, Any]:
    request = pickle.dumps(
        {"target": target, "kwargs": kwargs, "imports": list(imports), "memory_bytes": int(memory_mb * 2**20)},
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    env = {
        **os.environ,
        **_CHILD_ENV,
        "PYTHONPATH": os.pathsep.join([_PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    # The request goes in through a file, not a pipe: writing it cannot block on a child that
    # never reads, so the deadline below covers every wait.
    with tempfile.TemporaryFile() as stdin:
        stdin.write(request)
        stdin.seek(0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "unimoe_ray.serve.sandbox"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            close_fds=True,
            start_new_session=True,
        )  # its own process group: one kill ends all of it
    deadline = time.monotonic() + timeout_s
    try:
        out, err = _read_all(proc, deadline=deadline, limit=int(memory_mb * 2**20) + 2**20)
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # its pipes are closed: it is exiting
    except (TimeoutError, subprocess.TimeoutExpired):
        raise ValueError(f"{what} took longer than {timeout_s:g} s to decode: stopped (is the file damaged?)") from None
    except OverflowError:
        raise ValueError(f"decoding {what} produced more than {memory_mb:.0f} MB: refused") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    code = proc.returncode
    header, arrays = _parse(out)
    if header is None:
        # No answer: the child died (a signal, or the interpreter could not allocate at all).
        _LOG.warning(
            "decoder child for %s exited with %s without a result; stderr tail: %s",
            what,
            code,
            err.decode(errors="replace"),
        )
        cause = f"signal {-code}" if code < 0 else f"exit status {code}"
        raise ValueError(f"could not decode {what}: the decoder crashed ({cause}); is the file damaged?")
    if not header["ok"]:
        if header["kind"] == "memory":
            raise ValueError(f"decoding {what} needs more than {memory_mb:.0f} MB of memory: refused")
        if header["kind"] == "invalid":
            raise ValueError(header["message"])
        _LOG.warning("decoder child for %s failed: %s", what, header["message"])
        raise ValueError(f"could not decode {what}: {header['message']}")
    return {**header["scalars"], **arrays}


def _read_all(proc: subprocess.Popen, *, deadline: float, limit: int) -> tuple[bytes, bytes]:
    """The child's stdout (at most `limit` bytes) and the tail of its stderr, until both close,
    by `deadline`. Both are drained together: a child blocked on a full stderr pipe never ends."""
    out, err, size = [], b"", 0
    open_fds = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select(list(open_fds), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                del open_fds[fd]
            elif open_fds[fd] == "err":
                err = (err + chunk)[-4000:]
            else:
                size += len(chunk)
                if size > limit:
                    raise OverflowError
                out.append(chunk)
    return b"".join(out), err


def _parse(out: bytes) -> tuple[dict | None, dict[str, np.ndarray]]:
    """The child's answer: a 4-byte length, a JSON header, then one .npy per array name."""
    if len(out) < 4:
        return None, {}
    (n,) = struct.unpack("<I", out[:4])
    try:
        header = json.loads(out[4 : 4 + n])
        buf = io.BytesIO(out[4 + n :])
        arrays = {name: np.load(buf, allow_pickle=False) for name in header.get("arrays", [])}
    except (ValueError, OSError, EOFError):
        return None, {}  # a truncated answer: the child died while writing it
    return header, arrays


# ---- the child ----


def _cap_memory(extra_bytes: int) -> None:
    """RLIMIT_AS = what the child maps now + `extra_bytes` (the interpreter and its imports
    already map a few hundred MB of address space, which a fixed cap would have to guess)."""
    with open("/proc/self/status") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = vm_kb * 1024 + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # a decoder has no file to write
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _answer(out, header: dict, arrays: dict[str, np.ndarray]) -> None:
    blob = json.dumps({**header, "arrays": list(arrays)}).encode()
    out.write(struct.pack("<I", len(blob)) + blob)
    for a in arrays.values():
        # The .npy layout by hand: np.save wants a seekable file for tofile, and stdout is a pipe.
        npy_format.write_array_header_1_0(out, npy_format.header_data_from_array_1_0(a))
        out.write(a.data)
    out.flush()


def _child_main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library that prints would corrupt the answer: fd 1 now goes to stderr
    request = pickle.load(sys.stdin.buffer)  # from the parent replica (trusted), not the client
    for name in request["imports"]:
        importlib.import_module(name)
    module, name = request["target"].split(":")
    fn = getattr(importlib.import_module(module), name)
    _cap_memory(request["memory_bytes"])
    try:
        result = fn(**request["kwargs"]) or {}
        # Contiguous here, inside the try: np.save then writes without another copy.
        arrays = {k: np.ascontiguousarray(v) for k, v in result.items() if isinstance(v, np.ndarray)}
        scalars = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in result.items() if k not in arrays}
        header = {"ok": True, "scalars": scalars}
    except MemoryError:
        header, arrays = {"ok": False, "kind": "memory", "message": "out of memory"}, {}
    except ValueError as err:
        header, arrays = {"ok": False, "kind": "invalid", "message": str(err)}, {}
    except Exception as err:  # a decoder's own error class: the text names the cause
        header, arrays = {"ok": False, "kind": "error", "message": f"{type(err).__name__}: {err}"}, {}
    _answer(out, header, arrays)


if __name__ == "__main__":
    _child_main()
