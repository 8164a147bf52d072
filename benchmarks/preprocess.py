"""DAC encoding throughput: Ray Data actor pool vs a plain single-process loop, same files.

Both sides read the same 16 kHz WAVs and encode them with the same small random-weight DAC
(`DACCodec.random`, saved and loaded from a path as in the pipeline):
- loop: one process, `read_audio` + `DACCodec.encode` per file, torch's default thread count;
- ray:  `ray.data.from_items(paths)` -> `EncodeAudio` (the pipeline's stage, reading its own
  files) in an actor pool of --actors actors x --threads-per-actor torch threads, consumed by
  streaming.
Wall time includes the actor pool's start-up (each actor imports torch and loads the codec).
Reports audio-hours per wall-hour for each, their ratio, peak RSS, and the fraction of codes
that differ between the two (files are whole multiples of the encoder's length bucket, so no
padding differs; a different torch thread count can still flip a handful of codes through
float summation order).

    .venv/bin/python benchmarks/preprocess.py --files 32 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.audio.io import read_audio, write_wav
from unimoe_ray.data import music
from unimoe_ray.data.batch import objects
from unimoe_ray.data.config import EncodeConfig
from unimoe_ray.data.encode import EncodeAudio
from unimoe_ray.data.schema import OK


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (Ray's raylet, GCS and
    workers are children of a driver that started Ray) every 50 ms. RSS double-counts pages
    shared between processes (e.g. the plasma object store), so this is an upper bound."""

    def __init__(self):
        self.peak, self.peak_workers = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total, workers = me.memory_info().rss, 0
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                    total += rss
                    workers += rss if child.name().startswith("ray::") else 0
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.peak_workers = max(self.peak_workers, workers + me.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_files(folder: Path, n: int, seconds: float, sr: int = 16000) -> list[Path]:
    paths = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        piece = music.compose(
            rng,
            tonic=int(rng.integers(12)),
            mode="major",
            bpm=int(rng.integers(70, 150)),
            n_bars=int(np.ceil(seconds * 150 / 240)) + 1,
            instrument="strings",
            drums=True,
        )
        wav = np.resize(music.render(piece, sr, rng), int(seconds * sr))  # exact length
        paths.append(folder / f"clip_{i:04d}.wav")
        write_wav(paths[-1], wav, sr)
    return paths


def run_loop(paths: list[Path], dac_path: Path) -> tuple[float, dict[str, np.ndarray], PeakRSS]:
    """The baseline: one process, files one after another, torch's thread setting as is."""
    codec = DACCodec.load(dac_path)
    codec.encode(np.zeros(16000, np.float32), 16000)  # first-call set-up, as an actor's would be
    codes = {}
    with PeakRSS() as mem:
        start = time.perf_counter()
        for path in paths:
            wav, sr = read_audio(path)
            codes_KT = codec.encode(wav, sr).numpy().astype(np.uint16)
            codes[path.name] = codes_KT
        wall = time.perf_counter() - start
    return wall, codes, mem


class ReadAndEncode(EncodeAudio):
    """The pipeline's DAC stage, reading its own files: reading a WAV takes milliseconds, and a
    separate read stage would only add worker processes competing for the same two cores."""

    def __call__(self, batch: dict) -> dict:
        wavs = [read_audio(p)[0] for p in batch["path"]]
        n = len(wavs)
        rows = {
            "sample_id": np.array([Path(p).name for p in batch["path"]], dtype=object),
            "status": np.array([OK] * n, dtype=object),
            "reason": np.array([""] * n, dtype=object),
            "detail": np.array([""] * n, dtype=object),
            "wav": objects(wavs),
        }
        return super().__call__(rows)


def run_ray(paths: list[Path], dac_path: Path, actors: int, threads: int, batch_rows: int):
    import ray
    from ray.data import ActorPoolStrategy

    ray.init(num_cpus=actors * threads, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    codes = {}
    with PeakRSS() as mem:
        start = time.perf_counter()
        ds = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=len(paths))
        ds = ds.map_batches(
            ReadAndEncode,
            fn_constructor_kwargs={"cfg": EncodeConfig(dac_path=str(dac_path), threads_per_actor=threads)},
            batch_size=batch_rows,
            compute=ActorPoolStrategy(size=actors),
            num_cpus=threads,
        )
        for batch in ds.iter_batches(batch_size=None):
            for name, flat, n_frames in zip(batch["sample_id"], batch["codes"], batch["n_frames"]):
                codes[str(name)] = np.asarray(flat, np.uint16).reshape(12, int(n_frames))
        wall = time.perf_counter() - start
    ray.shutdown()
    return wall, codes, mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--threads-per-actor", type=int, default=1)
    p.add_argument("--batch-rows", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="alternate loop and ray this many times; medians")
    p.add_argument("--loop-threads", type=int, default=None, help="torch threads of the loop (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.loop_threads:
        torch.set_num_threads(args.loop_threads)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_files(folder, args.files, args.seconds)
        dac_path = DACCodec.random(seed=0).save(folder / "dac_random.pth")
        audio_h = args.files * args.seconds / 3600
        # Alternating, so a burst of load from elsewhere on the machine hits both sides.
        for _ in range(args.repeat):
            loop_s, loop_codes, loop_mem = run_loop(paths, dac_path)
            ray_s, ray_codes, ray_mem = run_ray(paths, dac_path, args.actors, args.threads_per_actor, args.batch_rows)
            runs.append((loop_s, ray_s, os.getloadavg()[0]))

    mib = 1 << 20
    loop_s = float(np.median([r[0] for r in runs]))
    ray_s = float(np.median([r[1] for r in runs]))
    result = {
        "audio_hours": round(audio_h, 4),
        "cpu_count": os.cpu_count(),
        "runs_wall_s_loop_ray_loadavg1m": [[round(v, 2) for v in r] for r in runs],
        "loop": {
            "torch_threads": torch.get_num_threads(),
            "median_wall_s": round(loop_s, 2),
            "audio_h_per_wall_h": round(audio_h * 3600 / loop_s, 1),
            "peak_rss_mib": round(loop_mem.peak / mib),
        },
        "ray": {
            "actors": args.actors,
            "threads_per_actor": args.threads_per_actor,
            "median_wall_s": round(ray_s, 2),
            "audio_h_per_wall_h": round(audio_h * 3600 / ray_s, 1),
            "peak_rss_mib_driver_plus_workers": round(ray_mem.peak_workers / mib),
            "peak_rss_mib_all_ray_processes": round(ray_mem.peak / mib),
        },
        "speedup": round(loop_s / ray_s, 2),
        "codes_differing_fraction": float(
            np.mean(np.concatenate([(loop_codes[k] != ray_codes[k]).ravel() for k in sorted(loop_codes)]))
        ),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
