r"""Generate the mini corpus (speech, music, video, deliberately broken rows) and, with
--with-assets, a test tokenizer and a random-weight DAC to preprocess it with.

    python jobs/make_mini_corpus.py --out data/mini --with-assets
    python jobs/preprocess.py --manifest data/mini/manifest.jsonl --out data/mini_shards \
        --tokenizer data/mini/assets/tokenizer --dac-path data/mini/assets/dac_random.pth

Needs espeak-ng and ffmpeg on PATH. The same --seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unimoe_ray.data.mini_corpus import MiniCorpusConfig, make_mini_corpus, manifest_counts, write_test_assets


def main(argv: list[str] | None = None) -> None:
    defaults = MiniCorpusConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=defaults.seed)
    for rows in ("n_tts_en", "n_tts_zh", "n_t2m", "n_v2m"):
        p.add_argument("--" + rows.replace("_", "-"), type=int, default=getattr(defaults, rows))
    p.add_argument(
        "--long-music-seconds",
        type=float,
        default=defaults.long_music_seconds,
        help="length of the first T2M piece (0: no long piece)",
    )
    p.add_argument("--no-broken", action="store_true", help="leave out the broken rows")
    p.add_argument(
        "--with-assets", action="store_true", help="also write assets/tokenizer (test BPE) and assets/dac_random.pth"
    )
    args = p.parse_args(argv)

    cfg = MiniCorpusConfig(
        n_tts_en=args.n_tts_en,
        n_tts_zh=args.n_tts_zh,
        n_t2m=args.n_t2m,
        n_v2m=args.n_v2m,
        long_music_seconds=args.long_music_seconds,
        broken=not args.no_broken,
        seed=args.seed,
    )
    start = time.perf_counter()
    manifest = make_mini_corpus(args.out, cfg)
    by_task, broken = manifest_counts(manifest)
    print(f"wrote {manifest} in {time.perf_counter() - start:.1f} s: {by_task}, {broken} broken")
    if args.with_assets:
        tokenizer, dac = write_test_assets(args.out / "assets", seed=args.seed)
        print(f"assets: --tokenizer {tokenizer} --dac-path {dac}")


if __name__ == "__main__":
    main()
