"""The whole product on an embedded local Ray (`make demo`): generated corpus → Ray Data
preprocessing → the three curriculum stages on Ray Train → Ray Serve → one voice-cloned TTS,
one text-to-music and one video-to-music request over HTTP → WAVs and a summary.

The console gets one line per stage; everything else this process and its Ray workers print
(Ray's start-up lines, the workers' forwarded logs, Ray Data's progress bars, which the train
workers redraw many times a second) goes to `OUT/demo.log`.

Every step is the library code users run (the same functions as jobs/make_mini_corpus.py,
jobs/preprocess.py, jobs/train_stage{1,2,3}.py and serve_configs/): only the sizes are small
(a few minutes on 2 CPU cores at the `small` preset). The weights start random and train for a
few steps, so the audio is noise; the point is that every stage runs and hands its output to
the next.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import ray
from ray import serve

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.audio.io import read_audio, write_wav
from unimoe_ray.data.config import EncodeConfig, PreprocessConfig
from unimoe_ray.data.mini_corpus import MiniCorpusConfig, make_mini_corpus
from unimoe_ray.data.pipeline import run_preprocess
from unimoe_ray.serve.app import build_app
from unimoe_ray.text.tokenizer import build_test_tokenizer
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.stages import ALL_TASKS, Common, stage1, stage2, stage3

SAMPLE_RATE = 24000  # the API's output rate


@dataclass(frozen=True, kw_only=True)
class ProductConfig:
    out_dir: str = "outputs/demo"
    preset: str = "small"
    steps: tuple[int, int, int] = (6, 6, 6)  # optimizer steps of stage 1 (each task), 2, 3
    max_tokens: int = 2048  # tokens per training micro-batch
    corpus: tuple[int, int, int, int] = (6, 4, 4, 3)  # rows: tts_en, tts_zh, t2m, v2m
    seconds: float = 2.0  # audio per request
    seed: int = 0
    tts_text: str = "Hello from UniMoE Audio on Ray."
    music_caption: str = "A calm piano piece in C major at 80 bpm."


@contextlib.contextmanager
def console_to_log(log_path: Path) -> Iterator[Callable[[str], None]]:
    """While active, this process's stdout and stderr go to `log_path` (appended), and the
    function it yields prints one progress line to the console and to the log.

    The redirect is at the file-descriptor level (dup2 of fds 1 and 2), not a swap of
    sys.stdout: Ray writes the output it forwards from its workers, and C extensions and child
    processes write, to the descriptors themselves. On an exception the console gets a line
    naming the log, then (once restored) the traceback.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                        errors="replace")
    log = open(log_path, "a", buffering=1, encoding="utf-8")

    def say(msg: str) -> None:
        line = f"[demo {time.strftime('%H:%M:%S')}] {msg}"
        console.write(line + "\n")
        sys.stdout.flush()  # keep the log in order: what was printed before comes first
        log.write(line + "\n")

    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield say
    except BaseException:
        say(f"failed; the full output is in {log_path}")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err):
            os.close(fd)
        console.close()
        log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_summary(run_dir: Path) -> dict:
    """Last trained step's losses and routing from a stage run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("skipped")]
    first, last = rows[0], rows[-1]
    out = {"steps": last["step"], "loss_first": round(first["loss"], 3), "loss_last": round(last["loss"], 3),
           "ce_last": round(last["ce"], 3), "aux_last": round(last["aux_loss"], 4)}
    ept = [v for k, v in last.items() if k.endswith("/experts_per_token")]
    if ept:
        out["experts_per_token"] = round(float(np.mean(ept)), 2)
        out["null_share"] = round(float(np.mean([v for k, v in last.items() if k.endswith("/null_share")])), 3)
    out.update({k: round(v, 3) for k, v in last.items() if k.startswith("val/")})
    return out


def _request(http: httpx.Client, method: str, path: str, out: Path, **kw) -> dict:
    """One streamed request: time to first audio byte, total latency, the WAV written."""
    t0 = time.perf_counter()
    ttfa, chunks = None, []
    with http.stream(method, path, **kw) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.read().decode()[:500]}")
        for chunk in r.iter_bytes():
            if chunk and ttfa is None:
                ttfa = time.perf_counter() - t0
            chunks.append(chunk)
    latency = time.perf_counter() - t0
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32768.0
    write_wav(out, pcm, SAMPLE_RATE)
    return {"wav": out.name, "seconds_audio": round(len(pcm) / SAMPLE_RATE, 2),
            "ttfa_s": round(ttfa or latency, 2), "latency_s": round(latency, 2)}


def run_product(cfg: ProductConfig) -> dict:
    """The whole product; returns the summary (also written to OUT/summary.json). The console
    gets a line per stage, the full output goes to OUT/demo.log (see `console_to_log`)."""
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "demo.log"
    with console_to_log(log_path) as say:
        say(f"the full Ray output goes to {log_path}")
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", include_dashboard=False)  # an embedded Ray (RAY_ADDRESS joins a cluster)
        try:
            return _run_product(cfg, out, say)
        finally:
            if started:  # inside the redirect: Ray's shutdown lines go to the log too
                ray.shutdown()


def _run_product(cfg: ProductConfig, out: Path, say: Callable[[str], None]) -> dict:
    t_start = time.perf_counter()
    summary: dict = {"config": asdict(cfg)}
    say("1/6 generating the mini corpus (espeak-ng speech, synthesised music, videos) ...")
    n_en, n_zh, n_t2m, n_v2m = cfg.corpus
    manifest = make_mini_corpus(out / "corpus", MiniCorpusConfig(
        n_tts_en=n_en, n_tts_zh=n_zh, n_t2m=n_t2m, n_v2m=n_v2m, long_music_seconds=0.0, seed=cfg.seed))
    tokenizer = build_test_tokenizer(out / "assets" / "tokenizer")
    dac = DACCodec.random(seed=cfg.seed).save(out / "assets" / "dac_random.pth")

    say("2/6 preprocessing with Ray Data (decode, score, DAC-encode, balance → Parquet shards) ...")
    stats = run_preprocess(manifest, out / "shards", PreprocessConfig(
        tokenizer_path=str(tokenizer), encode=EncodeConfig(dac_path=str(dac))))
    summary["preprocess"] = {"items_in": stats["items_in"], "rows_out": stats["out"]["rows"],
                             "by_task": {t: v["rows"] for t, v in stats["out"]["by_task"].items()},
                             "quarantined": stats["quarantined"]["rows"], "filtered": stats["filtered"]["rows"]}
    say(f"   shards: {summary['preprocess']}")

    common = Common(shards=[str(out / "shards")], tokenizer=str(tokenizer), storage_path=str(out / "runs"))
    s1, s2, s3 = cfg.steps
    train = dict(max_tokens=cfg.max_tokens, warmup_steps=1, val_every=0, seed=cfg.seed)
    summary["stages"] = {}
    specialists = []
    for task in ALL_TASKS:
        say(f"3/6 stage 1: dense specialist for {task} ({s1} steps, Ray Train) ...")
        specialists.append(str(stage1(
            common, task=task, preset=cfg.preset, name=f"stage1_{task}", out=str(out / "models" / f"stage1_{task}"),
            train=stage_config("stage1", max_steps=s1, checkpoint_every=s1, **train))))
        summary["stages"][f"stage1_{task}"] = _stage_summary(out / "runs" / f"stage1_{task}")
    say(f"4/6 stage 2: specialists → DCMoE, router + shared experts warm up ({s2} steps) ...")
    m2 = stage2(common, specialists=specialists, name="stage2", out=str(out / "models" / "stage2"),
                train=stage_config("stage2", max_steps=s2, checkpoint_every=s2, **train))
    summary["stages"]["stage2"] = _stage_summary(out / "runs" / "stage2")
    say(f"5/6 stage 3: everything trains, aux-loss weight decaying ({s3} steps) ...")
    m3 = stage3(common, init=str(m2), name="stage3", out=str(out / "models" / "stage3"),
                train=stage_config("stage3", max_steps=s3, checkpoint_every=s3, **train))
    summary["stages"]["stage3"] = _stage_summary(out / "runs" / "stage3")

    say("6/6 serving the stage-3 model on Ray Serve and calling it over HTTP ...")
    model = {"checkpoint": str(m3), "tokenizer": str(tokenizer), "dac_path": str(dac), "preset": cfg.preset,
             "max_rows": 4, "max_len": 1400, "torch_threads": 1}
    ingress = {"voices_dir": str(out / "voices"), "api_keys_env": None, "speech_max_seconds": 20,
               "music_max_seconds": 20}
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"ingress": ingress, "speech": model, "music": model}), name="unimoe", route_prefix="/")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    ref = next(r for r in rows if r["task"] == "tts_en" and "expect" not in r)
    video = next(r for r in rows if r["task"] == "v2m" and "expect" not in r)
    ref_wav, ref_sr = read_audio(out / "corpus" / ref["audio"])
    buf = (out / "reference.wav")
    write_wav(buf, ref_wav[: int(3 * ref_sr)], ref_sr)
    requests = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            requests["tts_cloned"] = _request(http, "POST", "/v1/audio/speech", out / "tts.wav", json={
                "model": "unimoe-audio", "input": cfg.tts_text, "response_format": "pcm", "stream_format": "audio",
                "reference_audio": base64.b64encode(buf.read_bytes()).decode(), "reference_text": ref["text"],
                "max_seconds": cfg.seconds, "seed": cfg.seed})
            requests["text_to_music"] = _request(http, "POST", "/v1/audio/music", out / "music.wav", json={
                "prompt": cfg.music_caption, "duration": cfg.seconds, "response_format": "pcm", "stream": True,
                "seed": cfg.seed})
            with open(out / "corpus" / video["video"], "rb") as f:
                requests["video_to_music"] = _request(
                    http, "POST", "/v1/audio/music", out / "video_music.wav",
                    files={"video": ("clip.mp4", f, "video/mp4")},
                    data={"prompt": video.get("text") or "Music for this clip.", "duration": str(cfg.seconds),
                          "response_format": "pcm", "stream": "true", "seed": str(cfg.seed)})
    finally:
        serve.shutdown()
    summary["requests"] = requests
    summary["seconds_wall"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done in {summary['seconds_wall']} s; WAVs and summary.json in {out}")
    return summary


def format_summary(s: dict) -> str:
    lines = ["stage                 steps  loss first→last  experts/token  null share"]
    for name, st in s["stages"].items():
        lines.append(f"{name:20s} {st['steps']:6d}  {st['loss_first']:7.3f} → {st['loss_last']:7.3f}"
                     f"  {st.get('experts_per_token', '-'):>13}  {st.get('null_share', '-'):>10}")
    lines.append("request          audio s  TTFA s  latency s  wav")
    for name, r in s["requests"].items():
        lines.append(f"{name:15s} {r['seconds_audio']:8.2f} {r['ttfa_s']:7.2f} {r['latency_s']:10.2f}  {r['wav']}")
    return "\n".join(lines)
