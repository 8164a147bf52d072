"""Generate the mini corpus (speech, music, video, deliberately broken rows) and, with
--with-assets, a test tokenizer and a random-weight DAC to preprocess it with.

    python jobs/make_mini_corpus.py --out data/mini --with-assets
    python jobs/preprocess.py --manifest data/mini/manifest.jsonl --out data/mini_shards \
        --tokenizer data/mini/assets/tokenizer --dac-path data/mini/assets/dac_random.pth

Needs espeak-ng and ffmpeg on PATH. The same --seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from unimoe_ray.data.mini_corpus import MiniCorpusConfig, make_mini_corpus


def main(argv: list[str] | None = None) -> None:
    defaults = MiniCorpusConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--n-tts-en", type=int, default=defaults.n_tts_en)
    p.add_argument("--n-tts-zh", type=int, default=defaults.n_tts_zh)
    p.add_argument("--n-t2m", type=int, default=defaults.n_t2m)
    p.add_argument("--n-v2m", type=int, default=defaults.n_v2m)
    p.add_argument(
        "--long-music-seconds",
        type=float,
        default=defaults.long_music_seconds,
        help="length of the first T2M piece (0: no long piece)",
    )
    p.add_argument("--no-broken", action="store_true", help="leave out the broken rows")
    p.add_argument(
        "--with-assets",
        action="store_true",
        help="also write assets/tokenizer (test BPE) and assets/dac_random.pth",
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
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    print(
        f"wrote {manifest} in {time.perf_counter() - start:.1f} s: "
        f"{dict(Counter(r['task'] for r in rows))}, {sum('expect' in r for r in rows)} broken"
    )
    if args.with_assets:
        from unimoe_ray.audio.codec import DACCodec
        from unimoe_ray.text.tokenizer import build_test_tokenizer

        assets = args.out / "assets"
        tokenizer = build_test_tokenizer(assets / "tokenizer")
        dac = DACCodec.random(seed=args.seed).save(assets / "dac_random.pth")
        print(f"assets: --tokenizer {tokenizer} --dac-path {dac}")


if __name__ == "__main__":
    main()
