"""Serving beside hostile requests (issue 18): the same seeded good speech requests, once alone
and once mixed with the requests that once broke the service, side by side in one run:

    seed_2_64         /v1/audio/speech with "seed": 2**64
    temperature_tiny  /v1/audio/speech with "temperature": 1e-300
    rate_bomb         voice upload whose WAV header says 999983 Hz (tests/data/hostile)
    oversized_body    voice upload one MB over max_upload_mb
    truncated_wav     voice upload whose header promises 20 s, holding 0.5 s
    playlist_video    /v1/audio/music with an HLS playlist as the video
    unknown_voice     /v1/audio/speech with a voice that does not exist
    bad_json          /v1/audio/speech with a body that is not JSON

    python benchmarks/serve_faults.py --preset small --seconds 60              # the mix (default)
    python benchmarks/serve_faults.py --preset small --seconds 60 --mode flood # closed-loop flood
    python benchmarks/serve_faults.py --url http://127.0.0.1:8000   # a server already running

Two traffic shapes:
- `mix` (the issue's benchmark): `--clients` (8) closed-loop clients, each sending a seeded
  sequence in which a request is hostile with probability `--hostile-share` (each class
  equally likely) and otherwise good. The run without hostile traffic sends the same sequences
  with the hostile requests left out. This measures whether a bad request harms the others.
- `flood`: `--good-clients` good clients beside `--hostile-clients` clients sending only hostile
  requests back to back, no pause, no rate limit (auth off): a denial-of-service load, which
  only a rate limit in front of the service bounds; reported, not a target.

Load on a shared machine drifts, so each shape runs `--rounds` times alternating (good only,
with hostile, good only, ...) and the latencies of each condition are pooled.

Without --url it starts `serve run` on serve_configs/local_cpu.yaml (its own local Ray:
`--address local`; a free port, one replica per model so that a new replica process is a
restart, voices in a temporary folder; everything else as shipped). A good request counts as a
success only with status 200 and exactly the audio it asked for (speech cannot end before 2 s,
so max_seconds <= 2 gives that length); a hostile one only with a 4xx in the API's error shape.

Reports: good-request success rate (target 100 %), p50/p99 latency and time to first audio of
good requests in both conditions and their ratio (target <= 1.3x), the hostile requests'
statuses per class, replica restarts (replica processes that ended during a run) and peak RSS of
each model replica with its children (the upload decoders run as child processes), sampled by
psutil. The replicas are found by their process titles (`ray::ServeReplica:unimoe:SpeechModel`):
with --url only on this machine. Writes benchmarks/results/serve_faults.json with the machine
and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml
from machine import machine_line  # benchmarks/machine.py
from serve_load import machine  # benchmarks/serve_load.py: the machine dict every serving result carries

from unimoe_ray.apps.ports import free_port

REPO = Path(__file__).resolve().parents[1]
HOSTILE = REPO / "tests" / "data" / "hostile"
RATE = 24000
FRAME_SAMPLES = RATE // 50
DEPLOYMENTS = ("SpeechModel", "MusicModel")
TEXT = "The quick brown fox jumps over the lazy dog."
HOSTILE_KINDS = (
    "bad_json",
    "oversized_body",
    "playlist_video",
    "rate_bomb",
    "seed_2_64",
    "temperature_tiny",
    "truncated_wav",
    "unknown_voice",
)  # the classes of the module docstring


# ---- the server ----


def start_server(args, tmp: Path) -> tuple[str, subprocess.Popen, dict]:
    """`serve run` on the shipped CPU config, adjusted as the module docstring says."""
    cfg = yaml.safe_load((REPO / "serve_configs" / "local_cpu.yaml").read_text())
    port = free_port()
    cfg["http_options"].update(host="127.0.0.1", port=port)
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    ingress = dict(deps["APIIngress"]["user_config"], voices_dir=str(tmp / "voices"), api_keys_env=None)
    deps["APIIngress"]["user_config"] = ingress
    for name in DEPLOYMENTS:
        d = deps[name]
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        model = dict(
            d["user_config"],
            preset=args.preset,
            artifacts_dir=str((REPO / d["user_config"]["artifacts_dir"]).resolve()),
        )
        if args.expert_dtype is not None:
            model["expert_dtype"] = None if args.expert_dtype == "none" else args.expert_dtype
        d["user_config"] = model
    path = tmp / "serve_faults.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp / "serve_run.log", "wb")
    # --address local: a Ray of its own, never another one running on this machine.
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(path), "--address", "local"],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve run exited ({proc.returncode}); log: {tmp / 'serve_run.log'}")
        try:
            if httpx.get(url + "/v1/status", timeout=10).status_code == 200:
                return url, proc, ingress
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the app did not answer within {args.startup_timeout} s; log: {tmp / 'serve_run.log'}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGKILL the processes of `serve run`'s session: it and the local Ray it started."""
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == proc.pid:
                p.send_signal(signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def replica_processes(app: str, session: int | None) -> dict[str, list[psutil.Process]]:
    """Model replica processes by deployment, from their titles (Ray names each actor's
    process `ray::<class name>`); only those of `session` when given."""
    found: dict[str, list[psutil.Process]] = {d: [] for d in DEPLOYMENTS}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            title = " ".join(p.info["cmdline"] or [])
            if session is not None and os.getsid(p.pid) != session:
                continue
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        for d in DEPLOYMENTS:
            if title.startswith(f"ray::ServeReplica:{app}:{d}"):
                found[d].append(p)
    # A replica's child between fork and exec (an upload decoder starting) still carries the
    # replica's title: a process whose parent is a replica is not one.
    pids = {p.pid for procs in found.values() for p in procs}
    for d, procs in found.items():
        found[d] = [p for p in procs if _ppid(p) not in pids]
    return found


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _ppid(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.Error:
        return None


class ReplicaWatch:
    """Samples the model replicas every `interval` s: pids seen (a pid that ends is a replica
    lost; Serve's replacement is a new pid), peak RSS of each replica, and peak RSS of the
    replica with its children (the upload decoders) at one sample."""

    def __init__(self, app: str, session: int | None, interval: float = 0.25) -> None:
        self.app, self.session, self.interval = app, session, interval
        self.seen: dict[str, set[int]] = {d: set() for d in DEPLOYMENTS}
        self.peak_mb: dict[str, float] = {d: 0.0 for d in DEPLOYMENTS}
        self.peak_with_children_mb: dict[str, float] = {d: 0.0 for d in DEPLOYMENTS}
        self.max_children: dict[str, int] = {d: 0 for d in DEPLOYMENTS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for d, procs in replica_processes(self.app, self.session).items():
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    # A child not yet exec'd still maps (and counts as resident) the replica's
                    # pages, shared copy-on-write: only exec'd children are the decoders' memory.
                    children = [c for c in p.children(recursive=True) if not _title(c).startswith("ray::")]
                    with_children = rss + sum(c.memory_info().rss for c in children)
                except psutil.Error:
                    continue
                self.seen[d].add(p.pid)
                self.peak_mb[d] = max(self.peak_mb[d], rss / 2**20)
                self.peak_with_children_mb[d] = max(self.peak_with_children_mb[d], with_children / 2**20)
                self.max_children[d] = max(self.max_children[d], len(children))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "ReplicaWatch":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict:
        alive = {d: {p.pid for p in procs} for d, procs in replica_processes(self.app, self.session).items()}
        return {
            d: {
                "replicas_seen": len(self.seen[d]),
                "restarts": len(self.seen[d] - alive[d]),
                "peak_rss_mb": round(self.peak_mb[d], 1) if self.seen[d] else None,
                "peak_rss_with_children_mb": round(self.peak_with_children_mb[d], 1) if self.seen[d] else None,
                "max_children": self.max_children[d],
            }
            for d in DEPLOYMENTS
        }


# ---- requests ----


def good_request(rng: random.Random) -> dict:
    return {
        "input": TEXT,
        "voice": "default",
        "response_format": "pcm",
        "max_seconds": round(rng.uniform(0.5, 2.0), 2),
        "seed": rng.randrange(1 << 30),
    }


def send_good(c: httpx.Client, body: dict) -> dict:
    frames = max(1, round(body["max_seconds"] * 50))
    t0 = time.monotonic()
    ttfa, size, error = None, 0, None
    try:
        with c.stream("POST", "/v1/audio/speech", json=body) as r:
            for chunk in r.iter_bytes():
                ttfa = ttfa if ttfa is not None else time.monotonic() - t0
                size += len(chunk)
            if r.status_code != 200:
                error = f"status {r.status_code}: {r.read()[:200]!r}"
            elif size != frames * FRAME_SAMPLES * 2:
                error = f"{size} bytes of PCM, asked for {frames * FRAME_SAMPLES * 2}"
    except httpx.HTTPError as err:
        error = f"{type(err).__name__}: {err}"[:200]
    return {"latency": time.monotonic() - t0, "ttfa": ttfa, "error": error}


def hostile_payloads(max_upload_mb: float) -> dict:
    missing = [n for n in ("sample_rate_bomb.wav", "truncated.wav", "playlist.m3u8") if not (HOSTILE / n).is_file()]
    if missing:
        raise SystemExit(f"{HOSTILE} lacks {missing}: run python tests/data/make_hostile_files.py")
    big = b"\0" * int((max_upload_mb + 1) * 2**20)
    payloads = {
        "seed_2_64": ("json", "/v1/audio/speech", {"input": "Hi.", "seed": 2**64}),
        "temperature_tiny": ("json", "/v1/audio/speech", {"input": "Hi.", "temperature": 1e-300}),
        "rate_bomb": ("voice", (HOSTILE / "sample_rate_bomb.wav").read_bytes()),
        "oversized_body": ("voice", big),
        "truncated_wav": ("voice", (HOSTILE / "truncated.wav").read_bytes()),
        "playlist_video": ("video", (HOSTILE / "playlist.m3u8").read_bytes()),
        "unknown_voice": ("json", "/v1/audio/speech", {"input": "Hi.", "voice": "nobody_has_this_voice"}),
        "bad_json": ("raw", "/v1/audio/speech", b'{"input": "Hi.", '),
    }
    assert tuple(sorted(payloads)) == HOSTILE_KINDS
    return payloads


def send_hostile(c: httpx.Client, kind: str, payload: tuple, n: str) -> dict:
    how = payload[0]
    try:
        if how == "json":
            r = c.post(payload[1], json=payload[2])
        elif how == "raw":
            r = c.post(payload[1], content=payload[2], headers={"content-type": "application/json"})
        elif how == "voice":
            r = c.post(
                "/v1/audio/voices",
                files={"audio_sample": ("upload.wav", payload[1], "audio/wav")},
                data={"name": f"hostile_{kind}_{n}", "ref_text": "Words."},
            )
        else:
            r = c.post(
                "/v1/audio/music",
                files={"video": ("clip.mp4", payload[1], "video/mp4")},
                data={"prompt": "Music.", "duration": "1"},
            )
        shaped = 400 <= r.status_code < 500 and set(r.json().get("error", {})) >= {"message", "type"}
        return {"kind": kind, "status": r.status_code, "ok": shaped}
    except (httpx.HTTPError, ValueError) as err:
        return {"kind": kind, "status": f"{type(err).__name__}", "ok": False}


def run_load(url: str, args, *, hostile: dict | None, round_: int = 0) -> dict:
    """One run until the deadline. `mix`: each client's seeded sequence of good and hostile
    requests (the hostile ones left out when `hostile` is None). `flood`: good clients beside
    clients sending only hostile requests (none when `hostile` is None)."""
    good: list[dict] = []
    bad: list[dict] = []
    deadline = time.monotonic() + args.seconds
    classes = HOSTILE_KINDS
    # Every round draws fresh sequences (the same ones for both conditions of that round).
    base_seed = args.seed * 1_000_000 + round_ * 10_000

    def mix_client(i: int) -> None:
        rng = random.Random(base_seed + i)
        n = 0
        with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
            while time.monotonic() < deadline:
                body = good_request(rng)  # drawn in both conditions: the good sequence is the same
                if rng.random() < args.hostile_share:
                    kind = rng.choice(classes)
                    if hostile is not None:
                        bad.append(send_hostile(c, kind, hostile[kind], f"{round_}_{i}_{n}"))
                        n += 1
                    continue
                good.append(send_good(c, body))

    def good_client(i: int) -> None:
        rng = random.Random(base_seed + i)
        with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
            while time.monotonic() < deadline:
                good.append(send_good(c, good_request(rng)))

    def flood_client(i: int) -> None:
        rng = random.Random(base_seed + 500 + i)
        n = 0
        with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
            while time.monotonic() < deadline:
                kind = rng.choice(classes)
                bad.append(send_hostile(c, kind, hostile[kind], f"{round_}_{i}_{n}"))
                n += 1

    if args.mode == "mix":
        threads = [threading.Thread(target=mix_client, args=(i,)) for i in range(args.clients)]
    else:
        threads = [threading.Thread(target=good_client, args=(i,)) for i in range(args.good_clients)]
        if hostile is not None:
            threads += [threading.Thread(target=flood_client, args=(i,)) for i in range(args.hostile_clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.monotonic() - t0, "good": good, "bad": bad, "load_after": round(os.getloadavg()[0], 2)}


def summarise(runs: list[dict], hostile: bool) -> dict:
    """Pooled figures of one condition's runs."""
    good = [r for run in runs for r in run["good"]]
    bad = [r for run in runs for r in run["bad"]]
    wall = sum(run["wall_s"] for run in runs)
    ok = [r for r in good if r["error"] is None]
    lat = np.array([r["latency"] for r in ok]) if ok else np.full(1, np.nan)
    ttfa = np.array([r["ttfa"] for r in ok]) if ok else np.full(1, np.nan)
    out = {
        "wall_s": round(wall, 1),
        "good_requests": len(good),
        "good_ok": len(ok),
        "good_success_rate": round(len(ok) / len(good), 4) if good else None,
        "good_errors": sorted({r["error"] for r in good if r["error"]})[:5],
        "good_req_per_s": round(len(ok) / wall, 3),
        "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
        "p99_latency_s": round(float(np.percentile(lat, 99)), 3),
        "p50_ttfa_s": round(float(np.percentile(ttfa, 50)), 3),
        "p99_ttfa_s": round(float(np.percentile(ttfa, 99)), 3),
        "load_after": [run["load_after"] for run in runs],
    }
    if hostile:
        per_kind: dict[str, dict] = {}
        for r in bad:
            k = per_kind.setdefault(r["kind"], {"sent": 0, "refused_4xx": 0, "statuses": {}})
            k["sent"] += 1
            k["refused_4xx"] += bool(r["ok"])
            k["statuses"][str(r["status"])] = k["statuses"].get(str(r["status"]), 0) + 1
        out["hostile"] = dict(sorted(per_kind.items()))
        out["hostile_requests"] = len(bad)
        out["hostile_refused_4xx"] = sum(bool(r["ok"]) for r in bad)
    return out


def slots(url: str) -> dict:
    status = httpx.get(url + "/v1/status", timeout=30).json()
    return {
        d: {k: status[d].get(k) for k in ("running_rows", "running_requests", "waiting", "failed", "healthy")}
        for d in ("speech", "music")
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start `serve run` on local_cpu.yaml)")
    p.add_argument("--app", default="unimoe", help="the Serve application's name (replica process titles)")
    p.add_argument("--preset", default="small", help="model preset of the started server (tiny: quick)")
    p.add_argument(
        "--expert-dtype",
        default=None,
        choices=["fp32", "bf16", "int8", "none"],
        help="override the config's expert_dtype (none: as loaded)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="length of each run")
    p.add_argument("--mode", choices=["mix", "flood"], default="mix", help="traffic shape (module docstring)")
    p.add_argument("--rounds", type=int, default=2, help="alternating good-only / with-hostile runs per condition")
    p.add_argument("--clients", type=int, default=8, help="mix: clients, each with its seeded good/hostile sequence")
    p.add_argument("--hostile-share", type=float, default=0.25, help="mix: chance that a request is hostile")
    p.add_argument("--good-clients", type=int, default=4, help="flood: good clients")
    p.add_argument("--hostile-clients", type=int, default=4, help="flood: clients sending only hostile requests")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        help="the server's max_upload_mb (default: the started config's; 10 with --url)",
    )
    p.add_argument("--request-timeout", type=float, default=120.0, help="client timeout per request")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve_faults.json")
    args = p.parse_args()
    if not 0.0 <= args.hostile_share < 1.0:
        p.error(f"--hostile-share must be in [0, 1), got {args.hostile_share}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")

    print(machine_line(), flush=True)
    results = {"machine_before": {**machine(), "cores": os.cpu_count()}, "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="serve_faults_"))
    proc = None
    try:
        if args.url:
            url, session, max_mb = args.url.rstrip("/"), None, args.max_upload_mb or 10.0
        else:
            url, proc, ingress = start_server(args, tmp)
            session, max_mb = proc.pid, args.max_upload_mb or float(ingress["max_upload_mb"])
        hostile = hostile_payloads(max_mb)
        with httpx.Client(base_url=url, timeout=args.request_timeout) as c:  # warm-up: voice library, first decode
            for i in range(3):
                send_good(c, good_request(random.Random(10_000 + i)))
        conditions = {"good_only": None, "with_hostile": hostile}
        runs: dict[str, list[dict]] = {name: [] for name in conditions}
        watches: dict[str, list[dict]] = {name: [] for name in conditions}
        for round_ in range(args.rounds):
            for name, mix in conditions.items():
                with ReplicaWatch(args.app, session) as watch:
                    run = run_load(url, args, hostile=mix, round_=round_)
                runs[name].append(run)
                watches[name].append(watch.report())
                ok = sum(r["error"] is None for r in run["good"])
                print(
                    f"round {round_} {name:12s} good {ok}/{len(run['good'])} hostile {len(run['bad'])} "
                    f"load {run['load_after']}",
                    flush=True,
                )
        for name in conditions:
            res = summarise(runs[name], hostile=conditions[name] is not None)
            res["replicas"] = {
                d: {
                    "restarts": sum(w[d]["restarts"] for w in watches[name]),
                    "peak_rss_mb": max((w[d]["peak_rss_mb"] or 0) for w in watches[name]),
                    "peak_rss_with_children_mb": max((w[d]["peak_rss_with_children_mb"] or 0) for w in watches[name]),
                    "max_children": max(w[d]["max_children"] for w in watches[name]),
                }
                for d in DEPLOYMENTS
            }
            res["slots_after"] = slots(url)
            results[name] = res
            print(
                f"{name:12s} good {res['good_ok']}/{res['good_requests']} ok "
                f"p50/p99 latency {res['p50_latency_s']:.2f}/{res['p99_latency_s']:.2f} s "
                f"p50/p99 TTFA {res['p50_ttfa_s']:.2f}/{res['p99_ttfa_s']:.2f} s "
                f"hostile {res.get('hostile_requests', 0)} (4xx {res.get('hostile_refused_4xx', 0)}) "
                f"restarts {sum(r['restarts'] for r in res['replicas'].values())} "
                f"peak RSS MB (speech, music) {[r['peak_rss_mb'] for r in res['replicas'].values()]} "
                f"with children {[r['peak_rss_with_children_mb'] for r in res['replicas'].values()]} "
                f"slots after {res['slots_after']}",
                flush=True,
            )
        base, mixed = results["good_only"], results["with_hostile"]
        results["ratio"] = {
            k: round(mixed[k] / base[k], 3) if base[k] else None
            for k in ("p50_latency_s", "p99_latency_s", "p50_ttfa_s", "p99_ttfa_s")
        }
        print("hostile/good-only latency ratio:", results["ratio"])
        for kind, k in mixed.get("hostile", {}).items():
            print(f"  {kind:18s} sent {k['sent']:4d}  refused with a 4xx {k['refused_4xx']:4d}  {k['statuses']}")
    finally:
        if proc is not None:
            stop_server(proc)
    shutil.rmtree(tmp, ignore_errors=True)  # kept only when the run failed: it holds serve run's log
    results["machine_after"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
