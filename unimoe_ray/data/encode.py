"""DAC encoding as a Ray Data actor-pool stage: the codec loads once per actor.

Batching by length: each clip is zero-padded to the next multiple of `bucket_s` and clips with
the same padded length may share an encoder forward (up to `max_batch_seconds` of audio; on CPU
the default is one clip per forward, which is fastest there); codes are then trimmed to the
clip's own ceil(N / hop) frames. Because a clip is only ever padded by its own bucket rule, its
codes do not depend on which clips Ray happened to put in the same batch (DAC's convolutions
see the padding near the end of a clip), which keeps shards identical from run to run.

Shape legend: K codebooks, T frames, N samples.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from unimoe_ray.data.batch import mark, objects
from unimoe_ray.data.config import EncodeConfig
from unimoe_ray.data.schema import OK, QUARANTINED

_NO_CODES = np.zeros(0, np.uint16)
ENCODE_ERROR = "encode_error"  # quarantine reason; the detail starts with the exception type


def error_kind(detail: str) -> str:
    """The exception type an encode_error detail starts with, e.g. "OutOfMemoryError"."""
    return detail.split(":", 1)[0]


def check_encode_errors(statuses: list[str], reasons: list[str], details: list[str], max_fraction: float) -> None:
    """Raise RuntimeError when one kind of encode error hit more than `max_fraction` of the rows
    that reached the codec (rows still OK, plus those it quarantined); see
    EncodeConfig.max_error_fraction.

    Example: 3 rows OK, 5 quarantined with "OutOfMemoryError: ..." -> 5 / 8 > 0.5 -> raises.
    """
    reached = [i for i, (s, r) in enumerate(zip(statuses, reasons)) if s == OK or r == ENCODE_ERROR]
    failed = [i for i in reached if reasons[i] == ENCODE_ERROR]
    if not failed:
        return
    kind, n = Counter(error_kind(details[i]) for i in failed).most_common(1)[0]
    if n > max_fraction * len(reached):
        example = next(details[i] for i in failed if error_kind(details[i]) == kind)
        raise RuntimeError(
            f"the DAC stage failed on {n} of the {len(reached)} rows it received with {kind} "
            f"(more than max_error_fraction={max_fraction:g}), e.g. {example}. This is the "
            "codec or the machine, not the data: check the DAC checkpoint (--dac-path or "
            "UNIMOE_DAC_PATH); out of memory: lower --batch-rows, max_batch_seconds or "
            "--encode-actors"
        )


def length_buckets(lengths: list[int], bucket: int) -> dict[int, list[int]]:
    """Group item indices by length rounded up to a multiple of `bucket` samples.

    Example (bucket 8000): lengths [12000, 16000, 3000, 15000] -> {16000: [0, 1, 3], 8000: [2]}.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[-(-n // bucket) * bucket].append(i)
    return dict(groups)


class EncodeAudio:
    """Ray Data map_batches class: `wav` (float32, 16 kHz) -> `codes` (uint16, K*T flattened,
    codebook-major) and `n_frames`. Drops the waveform column: nothing downstream needs it."""

    def __init__(self, cfg: EncodeConfig):
        import torch

        from unimoe_ray.audio.codec import DACCodec

        # One intra-op thread per actor by default: on CPU, more actors scale better than more
        # threads per conv (see benchmarks/preprocess.py).
        torch.set_num_threads(cfg.threads_per_actor)
        self.codec = DACCodec.load(cfg.dac_path)
        hop, sr = self.codec.hop_length, self.codec.sample_rate
        self.bucket = max(1, round(cfg.bucket_s * sr / hop)) * hop
        self.max_batch_samples = int(cfg.max_batch_seconds * sr)

    def encode(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Clips at the codec rate -> uint16 codes (K, T_i) each."""
        codec = self.codec
        out: list[np.ndarray] = [None] * len(wavs)  # type: ignore[list-item]
        for padded, idx in sorted(length_buckets([len(w) for w in wavs], self.bucket).items()):
            padded_N = [np.pad(wavs[i], (0, padded - len(wavs[i]))) for i in idx]
            per_forward = max(1, self.max_batch_samples // padded)
            codes = codec.encode_batch(padded_N, codec.sample_rate, batch_size=per_forward)
            for i, codes_KT in zip(idx, codes):
                out[i] = codes_KT[:, : codec.num_frames(len(wavs[i]))].numpy().astype(np.uint16)
        return out

    def __call__(self, batch: dict) -> dict:
        n = len(batch["sample_id"])
        ok = [i for i in range(n) if batch["status"][i] == OK]
        codes, n_frames = [_NO_CODES] * n, np.zeros(n, np.int32)
        try:
            encoded = self.encode([np.asarray(batch["wav"][i], np.float32) for i in ok])
        except Exception as err:  # one bad clip must not sink the batch: retry one by one
            encoded = []
            for i in ok:
                try:
                    encoded.extend(self.encode([np.asarray(batch["wav"][i], np.float32)]))
                except Exception as row_err:  # noqa: PERF203 - rare path
                    encoded.append(None)
                    detail = f"{type(row_err).__name__}: {row_err} (whole batch: {err!r})"
                    mark(batch, i, QUARANTINED, ENCODE_ERROR, detail)
        for i, codes_KT in zip(ok, encoded):
            if codes_KT is not None:
                codes[i], n_frames[i] = codes_KT.reshape(-1), codes_KT.shape[1]
        del batch["wav"]
        batch["codes"], batch["n_frames"] = objects(codes), n_frames
        return batch
