"""Data: raw corpus -> filtered, balanced, tokenised Parquet shards for the four tasks.

Pure pieces (no Ray): `quality` (scorers), `music` and `mini_corpus` (the generated corpus),
`decode`, `stages`, `encode` (stage bodies), `balance`, `shards` (final outputs), `schema` (row
layout). Ray Data wiring: `pipeline`. Video frames -> vision-tower patches live in
`unimoe_ray.media.video` (shared with training and serving).
"""
