"""The whole product on an embedded local Ray (`make demo`): generated corpus → Ray Data
preprocessing → the three curriculum stages on Ray Train → Ray Serve → one voice-cloned TTS,
one text-to-music and one video-to-music request over HTTP → WAVs and a summary.

The console gets one line per stage; everything else this process and its Ray workers print
(Ray's start-up lines, the workers' forwarded logs, Ray Data's progress bars, which the train
workers redraw many times a second) goes to `OUT/demo.log`.

Every step is the library code users run (the same functions as jobs/make_mini_corpus.py,
jobs/preprocess.py, jobs/train_stage{1,2,3}.py, jobs/evaluate.py and serve_configs/): only the
sizes are small (a few minutes on 2 CPU cores at the `small` preset). The four specialists
start from the same random weights (`new_model` with the one seed) and train a few steps at
learning rates chosen by measurement so that each stage's loss visibly falls (ProductConfig);
the audio is still noise. What shows the learning:
- per stage, the mean training loss of the first and last few steps, and the validation CE
  (the rows every stage holds out, `train.batches.split_rows`) of the stage's initial and
  final model;
- the weight-free metrics (unimoe_ray.eval: teacher-forced CE and accuracy per codebook,
  experts per token, EOS rate ...) of the stage-3 model beside those of a random-init model of
  the same shapes and seed, on the same validation rows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import torch
from ray import serve

from unimoe_ray.apps.ports import free_port
from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.audio.io import read_audio, write_wav
from unimoe_ray.builders import new_model
from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.data.config import EncodeConfig, PreprocessConfig
from unimoe_ray.data.mini_corpus import MiniCorpusConfig, make_mini_corpus, write_test_assets
from unimoe_ray.data.pipeline import run_preprocess
from unimoe_ray.data.shards import shard_paths
from unimoe_ray.eval.harness import EvalConfig, run_eval, teacher_forced
from unimoe_ray.eval.judges import load_judges
from unimoe_ray.serve.app import build_app
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.text.tokenizer import load_tokenizer
from unimoe_ray.train.batches import split_rows
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.stages import ALL_TASKS, Common, stage1, stage2, stage3

SAMPLE_RATE = 24000  # the API's output rate


@dataclass(frozen=True, kw_only=True)
class ProductConfig:
    out_dir: str = "outputs/demo"
    preset: str = "small"
    steps: tuple[int, int, int] = (6, 6, 6)  # optimizer steps of stage 1 (each task), 2, 3
    # Learning rates of stages 1, 2, 3 for these few steps, chosen by measurement (README, "make
    # demo"): with the paper's 1e-4 / 3e-5 / 1e-5 (meant for its long runs) 6 steps of stage 2
    # left the validation CE flat and stage 3 moved it by 0.3; 3e-3 in stage 2 raised v2m's.
    lrs: tuple[float, float, float] = (3e-4, 1e-3, 1e-4)
    warmup_steps: int = 1
    # Frames per clip the evaluation generates (EOS allowed from frame 0) for its EOS rate,
    # silence and clipping; 0: teacher-forced metrics only. Off by default: at `small` a clip of
    # 50 frames (1 s) took 56-137 s on the busy 2-core machine, 8 clips would double the demo.
    eval_frames: int = 0
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
    console = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8", errors="replace")
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


def _mean_ends(losses: list[float]) -> tuple[int, float, float]:
    """(k, mean of the first k, mean of the last k) with k = min(3, half the steps, at least 1):
    one step's loss on a tiny batch is noisy (its rows and their lengths change every step)."""
    k = max(1, min(3, len(losses) // 2))
    return k, float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def _stage_summary(run_dir: Path, val_start: dict[str, float]) -> dict:
    """A stage run's training losses (first/last step, and the means of the first and last few
    steps), its routing at the last step and its validation CE per task at the start
    (`val_start`, the initial model's) and the end (the run's own last validation)."""
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("skipped")]
    first, last = rows[0], rows[-1]
    k, head, tail = _mean_ends([r["loss"] for r in rows])
    out = {
        "steps": last["step"],
        "loss_first": round(first["loss"], 3),
        "loss_last": round(last["loss"], 3),
        "loss_mean_steps": k,
        "loss_first_mean": round(head, 3),
        "loss_last_mean": round(tail, 3),
        "ce_last": round(last["ce"], 3),
        "aux_last": round(last["aux_loss"], 4),
    }
    ept = [v for k, v in last.items() if k.endswith("/experts_per_token")]
    if ept:
        out["experts_per_token"] = round(float(np.mean(ept)), 2)
        out["null_share"] = round(float(np.mean([v for k, v in last.items() if k.endswith("/null_share")])), 3)
    val_end = {k.removeprefix("val/"): v for k, v in last.items() if k.startswith("val/")}
    if val_start and val_end:
        out["val_ce_start"] = {t: round(v, 3) for t, v in val_start.items()}
        out["val_ce_end"] = {t: round(val_end[t], 3) for t in val_start}
        out["val_ce_start_mean"] = round(float(np.mean(list(val_start.values()))), 3)
        out["val_ce_end_mean"] = round(float(np.mean([val_end[t] for t in val_start])), 3)
    return out


def validation_rows(shards: list[str | Path], tasks: tuple[str, ...]) -> dict[str, list[dict]]:
    """Per task, the shard rows every training stage holds out for validation when it
    validates (`train.batches.split_rows`: by whole source clip, the same rows whatever other
    tasks the stage trains), in sample-id order; a task with a single clip has none."""
    ds = pads.dataset(shard_paths(shards), format="parquet")
    index = ds.to_table(columns=["sample_id", "task", "source_id"]).to_pylist()
    _, val_ids = split_rows(index, stage_config("stage3", tasks=tasks, val_every=1))
    rows = ds.to_table(filter=pc.field("sample_id").isin(sorted(val_ids))).to_pylist()
    return {
        t: sorted((r for r in rows if r["task"] == t), key=lambda r: r["sample_id"])
        for t in tasks
        if any(r["task"] == t for r in rows)
    }


def _val_ce(model_dir: Path, tokenizer, rows: dict[str, list[dict]], max_tokens: int) -> dict[str, float]:
    """Teacher-forced validation CE per task of the model in `model_dir` (eval.harness's
    `teacher_forced`: the training loss path's CE term, as the run's own validation)."""
    if not (model_dir / "config.json").is_file():
        raise RuntimeError(f"{model_dir} holds no model (config.json): the stage did not write its initial weights")
    model = load_pretrained(model_dir, dtype=torch.float32)
    prompts = PromptBuilder(tokenizer, model.cfg)
    return {t: teacher_forced(model, prompts, r, max_tokens)["ce"] for t, r in rows.items()}


# Weight-free metrics the summary keeps per task and model (eval.json's names).
EVAL_KEYS = (
    "rows",
    "ce",
    "accuracy",
    "ce_per_codebook",
    "accuracy_per_codebook",
    "experts_per_token",
    "null_share",
    "generated",
    "eos_rate",
    "mean_frames",
    "silence_ratio",
    "clipping_ratio",
)


def compare_to_random_init(
    checkpoint: Path, tokenizer_dir: Path, dac: Path, rows: dict[str, list[dict]], cfg: "ProductConfig"
) -> dict:
    """The stage-3 model's weight-free metrics (unimoe_ray.eval) beside a random-init model's of
    the same config and seed, on the validation rows: teacher-forced CE and accuracy (per
    codebook too), experts per token and null share; with `cfg.eval_frames` > 0 also the EOS
    rate, silence and clipping of clips generated up to that many frames with EOS allowed from
    frame 0 (the released min_frames, 2 s / 8 s, would cost minutes on CPU). The duration error
    is left out: the cap, not the model, sets the length."""
    tok = load_tokenizer(tokenizer_dir)
    trained = load_pretrained(checkpoint, dtype=torch.float32)
    models = {"random_init": new_model(trained.cfg, tok, seed=cfg.seed), "stage3": trained}
    gen = cfg.eval_frames > 0
    ecfg = EvalConfig(
        tasks=tuple(rows),
        max_tokens=max(cfg.max_tokens, 4096),
        generate=gen,
        gen_batch=4,
        seed=cfg.seed,
        sampling={"max_frames": cfg.eval_frames, "min_frames": 0} if gen else {},
    )
    codec = DACCodec.load(str(dac))
    out: dict = {
        "rows": {t: len(r) for t, r in rows.items()},
        "generation": (
            f"≤ {cfg.eval_frames} frames, EOS from frame 0"
            if gen
            else "off: --eval-frames N for EOS rate, silence, clipping"
        ),
    }
    for name, model in models.items():
        report = run_eval(model.eval(), PromptBuilder(tok, model.cfg), codec, load_judges(), ecfg, rows=rows, log=print)
        out[name] = {t: {k: m[k] for k in EVAL_KEYS if k in m} for t, m in report["tasks"].items()}
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
    return {
        "wav": out.name,
        "seconds_audio": round(len(pcm) / SAMPLE_RATE, 2),
        "ttfa_s": round(ttfa or latency, 2),
        "latency_s": round(latency, 2),
    }


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
    manifest = make_mini_corpus(
        out / "corpus",
        MiniCorpusConfig(n_tts_en=n_en, n_tts_zh=n_zh, n_t2m=n_t2m, n_v2m=n_v2m, long_music_seconds=0.0, seed=cfg.seed),
    )
    tokenizer, dac = write_test_assets(out / "assets", seed=cfg.seed)

    say("2/6 preprocessing with Ray Data (decode, score, DAC-encode, balance → Parquet shards) ...")
    stats = run_preprocess(
        manifest,
        out / "shards",
        PreprocessConfig(tokenizer_path=str(tokenizer), encode=EncodeConfig(dac_path=str(dac))),
    )
    summary["preprocess"] = {
        "items_in": stats["items_in"],
        "rows_out": stats["out"]["rows"],
        "by_task": {t: v["rows"] for t, v in stats["out"]["by_task"].items()},
        "quarantined": stats["quarantined"]["rows"],
        "filtered": stats["filtered"]["rows"],
    }
    say(f"   shards: {summary['preprocess']}")

    common = Common(shards=[str(out / "shards")], tokenizer=str(tokenizer), storage_path=str(out / "runs"))
    tok = load_tokenizer(tokenizer)
    val_rows = validation_rows(common.shards, ALL_TASKS)
    summary["validation_rows"] = {t: len(r) for t, r in val_rows.items()}
    s1, s2, s3 = cfg.steps
    lr1, lr2, lr3 = cfg.lrs

    # Each stage validates at its last step, which holds validation_rows() out of its training.
    def train_config(stage: str, lr: float, steps: int):
        """The stage's config for the demo: `steps` steps, one checkpoint and one validation at the end."""
        return stage_config(
            stage,
            lr=lr,
            max_steps=steps,
            checkpoint_every=steps,
            val_every=steps,
            max_tokens=cfg.max_tokens,
            warmup_steps=cfg.warmup_steps,
            seed=cfg.seed,
        )

    summary["stages"] = {}

    def run_stage(
        name: str, lr: float, init: Callable[[], Path], tasks: tuple[str, ...], fit: Callable[[], Path]
    ) -> Path:
        """fit() the stage; then its initial model (`init()`, once the stage has written it) is
        scored on the validation rows of its tasks: the start of its validation CE."""
        t0 = time.perf_counter()
        model = fit()
        start = _val_ce(init(), tok, {t: val_rows[t] for t in tasks if t in val_rows}, cfg.max_tokens)
        summary["stages"][name] = {
            "lr": lr,
            **_stage_summary(out / "runs" / name, start),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        return model

    def stage_init(name: str) -> Callable[[], Path]:
        return lambda: out / "runs" / name / "init"  # where stage1/stage2 write the weights they start from

    specialists = []
    for task in ALL_TASKS:
        say(f"3/6 stage 1: dense specialist for {task} ({s1} steps, lr {lr1:g}, Ray Train) ...")
        name = f"stage1_{task}"
        # Every specialist starts from the same weights: new_model(config, seed) in stage1.
        specialists.append(
            str(
                run_stage(
                    name,
                    lr1,
                    stage_init(name),
                    (task,),
                    lambda: stage1(
                        common,
                        task=task,
                        preset=cfg.preset,
                        name=name,
                        out=str(out / "models" / name),
                        train=train_config("stage1", lr1, s1),
                    ),
                )
            )
        )
    say(f"4/6 stage 2: specialists → DCMoE, router + shared experts warm up ({s2} steps, lr {lr2:g}) ...")
    m2 = run_stage(
        "stage2",
        lr2,
        stage_init("stage2"),
        ALL_TASKS,
        lambda: stage2(
            common,
            specialists=specialists,
            name="stage2",
            out=str(out / "models" / "stage2"),
            train=train_config("stage2", lr2, s2),
        ),
    )
    say(f"5/6 stage 3: everything trains, aux-loss weight decaying ({s3} steps, lr {lr3:g}) ...")
    m3 = run_stage(
        "stage3",
        lr3,
        lambda: m2,
        ALL_TASKS,
        lambda: stage3(
            common,
            init=str(m2),
            name="stage3",
            out=str(out / "models" / "stage3"),
            train=train_config("stage3", lr3, s3),
        ),
    )
    say(
        f"   evaluating the stage-3 model beside a random-init one on the {sum(summary['validation_rows'].values())}"
        " validation rows (unimoe_ray.eval) ..."
    )
    t0 = time.perf_counter()
    summary["eval"] = compare_to_random_init(m3, tokenizer, dac, val_rows, cfg)
    summary["eval"]["seconds"] = round(time.perf_counter() - t0, 1)

    say("6/6 serving the stage-3 model on Ray Serve and calling it over HTTP ...")
    model = {
        "checkpoint": str(m3),
        "tokenizer": str(tokenizer),
        "dac_path": str(dac),
        "preset": cfg.preset,
        "max_rows": 4,
        "max_len": 1400,
        "torch_threads": 1,
    }
    ingress = {
        "voices_dir": str(out / "voices"),
        "api_keys_env": None,
        "speech_max_seconds": 20,
        "music_max_seconds": 20,
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"ingress": ingress, "speech": model, "music": model}), name="unimoe", route_prefix="/")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    ref = next(r for r in rows if r["task"] == "tts_en" and "expect" not in r)
    video = next(r for r in rows if r["task"] == "v2m" and "expect" not in r)
    ref_wav, ref_sr = read_audio(out / "corpus" / ref["audio"])
    buf = out / "reference.wav"
    write_wav(buf, ref_wav[: int(3 * ref_sr)], ref_sr)
    requests = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            requests["tts_cloned"] = _request(
                http,
                "POST",
                "/v1/audio/speech",
                out / "tts.wav",
                json={
                    "model": "unimoe-audio",
                    "input": cfg.tts_text,
                    "response_format": "pcm",
                    "stream_format": "audio",
                    "reference_audio": base64.b64encode(buf.read_bytes()).decode(),
                    "reference_text": ref["text"],
                    "max_seconds": cfg.seconds,
                    "seed": cfg.seed,
                },
            )
            requests["text_to_music"] = _request(
                http,
                "POST",
                "/v1/audio/music",
                out / "music.wav",
                json={
                    "prompt": cfg.music_caption,
                    "duration": cfg.seconds,
                    "response_format": "pcm",
                    "stream": True,
                    "seed": cfg.seed,
                },
            )
            with open(out / "corpus" / video["video"], "rb") as f:
                requests["video_to_music"] = _request(
                    http,
                    "POST",
                    "/v1/audio/music",
                    out / "video_music.wav",
                    files={"video": ("clip.mp4", f, "video/mp4")},
                    data={
                        "prompt": video.get("text") or "Music for this clip.",
                        "duration": str(cfg.seconds),
                        "response_format": "pcm",
                        "stream": "true",
                        "seed": str(cfg.seed),
                    },
                )
    finally:
        serve.shutdown()
    summary["requests"] = requests
    summary["seconds_wall"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done in {summary['seconds_wall']} s; WAVs and summary.json in {out}")
    return summary


def _arrow(a, b, fmt: str) -> str:
    return "-" if a is None or b is None else f"{a:{fmt}} → {b:{fmt}}"


def format_summary(s: dict) -> str:
    """The console table: per stage its training loss (first → last step, and the means of the
    first and last few steps) and its validation CE at its start and end; per task the
    stage-3 model's weight-free metrics beside a random-init model's; per request its timing."""
    lines = ["stage              steps  lr      loss first→last   mean first→last   val CE start→end  experts/token"]
    for name, st in s["stages"].items():
        lines.append(
            f"{name:18s} {st['steps']:5d}  {st['lr']:<6g}  {_arrow(st['loss_first'], st['loss_last'], '6.2f')}"
            f"   {_arrow(st['loss_first_mean'], st['loss_last_mean'], '6.2f')}"
            f"   {_arrow(st.get('val_ce_start_mean'), st.get('val_ce_end_mean'), '6.2f'):>16s}"
            f"  {st.get('experts_per_token', '-'):>13}"
        )
    ev = s.get("eval")
    if ev:
        lines.append(f"validation rows: random init → stage 3 (generation {ev['generation']})")
        lines.append("task     rows  CE                acc              EOS rate      experts/token")
        for task, n in ev["rows"].items():
            r, t = ev["random_init"].get(task, {}), ev["stage3"].get(task, {})
            cells = [
                _arrow(r.get(k), t.get(k), f)
                for k, f in (("ce", "6.2f"), ("accuracy", ".3f"), ("eos_rate", ".2f"), ("experts_per_token", ".2f"))
            ]
            lines.append(f"{task:8s} {n:4d}  {cells[0]:16s}  {cells[1]:15s}  {cells[2]:12s}  {cells[3]}")
    lines.append("request          audio s  TTFA s  latency s  wav")
    for name, r in s["requests"].items():
        lines.append(f"{name:15s} {r['seconds_audio']:8.2f} {r['ttfa_s']:7.2f} {r['latency_s']:10.2f}  {r['wav']}")
    return "\n".join(lines)
