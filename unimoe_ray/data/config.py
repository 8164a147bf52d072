"""Configuration of the preprocessing pipeline: small frozen dataclasses.

Built from the command line in `jobs/preprocess.py` only; the stages take these objects (never
dicts). Every field has a default that suits the real corpus; tests shrink windows and sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unimoe_ray.tasks import DATA_TASKS as TASKS  # the paper's four tasks (unimoe_ray/tasks.py)
from unimoe_ray.tasks import MUSIC_TASKS, SPEECH_TASKS

# Tasks whose row is useless without text: the transcript (TTS) or the caption (T2M). V2M is
# conditioned on the video; its caption is optional.
TEXT_TASKS = ("tts_zh", "tts_en", "t2m")


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """Decoding, resampling and segmentation."""

    sample_rate: int = 16000  # DAC 16 kHz (docs/DESIGN.md §1)
    # Music is cut into fixed windows: the model generates at most 1000 frames = 20 s.
    music_window_s: float = 20.0
    # A music tail shorter than this is not worth a row (a file's first window is always kept).
    min_tail_s: float = 5.0
    min_duration_s: float = 1.0
    # Speech is not cut (a cut splits words from the transcript); longer clips are filtered.
    max_speech_s: float = 20.0
    # Peak below -60 dBFS: nothing a listener or the codec would call a signal.
    silence_peak: float = 1e-3


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """Video frames for V2M in Qwen2.5-VL's vision-tower layout (see `video.py`)."""

    fps: float = 2.0  # Qwen2.5-VL samples video at 1-2 fps
    # Frame size bounds for smart_resize; 224x224 keeps a 20 s clip at 2 fps to 1280 merged
    # vision tokens (20 temporal patches x 64), within the prompt budget of the trunk.
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """The DAC actor pool."""

    dac_path: str | None = None  # None: DACCodec.load reads UNIMOE_DAC_PATH
    actors: int = 1
    # One core per actor: actors scale, torch threads do not. Part of the output's identity:
    # a different thread count can flip a few codes (float summation order in the convs).
    threads_per_actor: int = 1
    batch_rows: int = 8  # rows per map_batches call
    # Clips are zero-padded to a multiple of this before encoding so that equal-length clips can
    # share one forward pass and a clip's codes never depend on its batch-mates (determinism).
    bucket_s: float = 0.5
    # Audio per encoder forward (same-bucket clips only). 0: one clip per forward, the fastest
    # on CPU, where a batch falls out of cache (one thread, 4 x 20 s batched: 2x slower than one
    # at a time). On GPU raise it, e.g. 300.
    max_batch_seconds: float = 0.0
    # The job fails (before writing shards) when one kind of encode error, e.g. OutOfMemoryError,
    # hits more than this fraction of the rows the codec received: that is a broken codec or
    # machine, not bad data, and finishing would hand over a quietly empty dataset. Below it,
    # failed rows are quarantined with the error and the job goes on. 1.0: never fail.
    max_error_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(
                f"encode max_error_fraction={self.max_error_fraction}: use a fraction in [0, 1]"
            )


@dataclass(frozen=True, kw_only=True)
class QualityRule:
    """Keep a row of `tasks` only if min_value <= score[scorer] <= max_value."""

    scorer: str
    tasks: tuple[str, ...]
    min_value: float | None = None
    max_value: float | None = None


# What each model scorer judges (paper §4.1): UTMOS speech quality; aesthetics and CLAP music.
MODEL_SCORER_TASKS = {"utmos": SPEECH_TASKS, "aesthetics": MUSIC_TASKS, "clap": MUSIC_TASKS}


@dataclass(frozen=True, kw_only=True)
class ModelScorerSpec:
    """A model-based scorer loaded from a local path (see `quality.build_model_scorer`).

    kind: "utmos" | "aesthetics" (TorchScript/torch modules) | "clap" (laion_clap checkpoint).
    """

    kind: str
    path: str
    tasks: tuple[str, ...]
    name: str = ""  # score column name; defaults to kind
    output_index: int | None = None  # which output of a multi-output module (Audiobox: 4 axes)


# Signal-level defaults (paper §4.1 uses UTMOS/aesthetics/CLAP, which need weights; these are the
# offline stand-ins). Thresholds are set on the generated corpus: clean espeak speech has an SNR
# estimate above 40 dB, speech under 0 dB white noise below 10 dB.
DEFAULT_RULES = (
    QualityRule(scorer="snr_db", tasks=SPEECH_TASKS, min_value=15.0),
    QualityRule(scorer="clipping_ratio", tasks=TASKS, max_value=0.01),
    QualityRule(scorer="silence_ratio", tasks=SPEECH_TASKS, max_value=0.6),
    QualityRule(scorer="silence_ratio", tasks=MUSIC_TASKS, max_value=0.3),
)


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    rules: tuple[QualityRule, ...] = DEFAULT_RULES
    model_scorers: tuple[ModelScorerSpec, ...] = ()


@dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    """Balanced subset (paper §4.1). No targets and no total: keep everything (stage 1 trains
    specialists on the full, imbalanced data).

    targets: explicit rows per task, e.g. (("tts_en", 100), ("t2m", 100)).
    total: split equally over the tasks present; a scarce task keeps all its rows and its
        shortfall is shared out among the others.
    """

    targets: tuple[tuple[str, int], ...] = ()
    total: int | None = None
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    tokenizer_path: str
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    rows_per_shard: int = 2000
    # Manifest rows per input block: small blocks keep the stream moving and memory flat.
    block_rows: int = 8
    # CPU share of the light stages (decode, tokenize, score, ...), so they fit beside the DAC
    # actors, which hold one whole core each.
    light_cpus: float = 0.25
    light_tasks: int = 2  # concurrent tasks per light task stage
    keep_staging: bool = False
