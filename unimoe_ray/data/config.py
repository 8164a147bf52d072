"""Configuration of the preprocessing pipeline: small frozen dataclasses, and `preprocess_config`,
which builds and checks them from the options of `jobs/preprocess.py` (rules as SCORE=VALUE,
scorers as KIND[:OUTPUT]=PATH, targets as TASK=ROWS). The stages take these objects (never
dicts). Every field has a default that suits the real corpus; tests shrink windows and sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from unimoe_ray.tasks import DATA_TASKS as TASKS  # the paper's four tasks (unimoe_ray/tasks.py)
from unimoe_ray.tasks import MUSIC_TASKS, SPEECH_TASKS


class PreprocessConfigError(ValueError):
    """A preprocessing option is malformed or could never apply; the message names the option
    and the fix."""


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
            raise ValueError(f"encode max_error_fraction={self.max_error_fraction}: use a fraction in [0, 1]")


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


# The signal scorers' score columns, in their order (unimoe_ray.data.quality.signal_scorers; a
# unit test holds the two together). They need no weights, so every run has them.
SIGNAL_SCORES = ("snr_db", "clipping_ratio", "silence_ratio")

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


def score_names(model_scorers: tuple[ModelScorerSpec, ...]) -> tuple[str, ...]:
    """Score columns of a run, in order: the signal scorers, then the model scorers."""
    return SIGNAL_SCORES + tuple(m.name or m.kind for m in model_scorers)


def check_rules(cfg: QualityConfig) -> None:
    """Raise PreprocessConfigError for a rule that could never apply: a score no scorer of the
    run produces (a typo, or a model score without its --model-scorer) or an unknown task.
    `quality.failed_rule` lets a missing score pass, so such a rule would silently keep every row."""
    known = score_names(cfg.model_scorers)
    for rule in cfg.rules:
        if rule.scorer not in known:
            raise PreprocessConfigError(
                f"quality rule on score {rule.scorer!r}, which no scorer of this run produces; "
                f"the known scores are {', '.join(known)}. A model score needs its scorer "
                "(--model-scorer KIND=PATH, kinds utmos, aesthetics, clap)"
            )
        unknown_tasks = sorted(set(rule.tasks) - set(TASKS))
        if unknown_tasks:
            raise PreprocessConfigError(
                f"quality rule on {rule.scorer!r} names unknown tasks {unknown_tasks}; tasks are {', '.join(TASKS)}"
            )


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


# From the command line (jobs/preprocess.py): each repeated option is a list of NAME=VALUE texts.

_VALUE_KIND = {float: "a number", int: "a whole number", str: "a path"}


def parse_pairs(
    items: Sequence[str], *, option: str, metavar: str, cast: Callable[[str], object] = str
) -> tuple[tuple[str, object], ...]:
    """["snr_db=15", ...] → (("snr_db", 15.0), ...) for the repeated `option`, whose `metavar`
    (e.g. SCORE=VALUE) names the parts in the error."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not (key and sep and value):
            raise PreprocessConfigError(f"{option} {item!r}: expected {metavar}")
        try:
            out.append((key, cast(value)))
        except ValueError:
            raise PreprocessConfigError(
                f"{option} {item}: {value!r} is not {_VALUE_KIND.get(cast, 'valid')} ({metavar})"
            ) from None
    return tuple(out)


def model_scorer_spec(item: str) -> ModelScorerSpec:
    """ "KIND[:OUTPUT]=PATH", e.g. "utmos=/w/utmos.pt" or "aesthetics:2=/w/audiobox.pt" (output 2
    of a multi-output module). The scorer judges the tasks of MODEL_SCORER_TASKS[KIND]."""
    ((kind_output, path),) = parse_pairs([item], option="--model-scorer", metavar="KIND[:OUTPUT]=PATH")
    kind, _, output = kind_output.partition(":")
    if kind not in MODEL_SCORER_TASKS:
        raise PreprocessConfigError(
            f"--model-scorer {item}: unknown kind {kind!r}; use one of {', '.join(MODEL_SCORER_TASKS)}"
        )
    if output and not output.isdigit():
        raise PreprocessConfigError(
            f"--model-scorer {item}: OUTPUT {output!r} must be a whole number (which output of the module)"
        )
    return ModelScorerSpec(
        kind=kind, path=path, tasks=MODEL_SCORER_TASKS[kind], output_index=int(output) if output else None
    )


def quality_config(
    *, model_scorers: Sequence[str] = (), mins: Sequence[str] = (), maxs: Sequence[str] = (), default_rules: bool = True
) -> QualityConfig:
    """The scorers (KIND[:OUTPUT]=PATH) and the rules: DEFAULT_RULES unless `default_rules` is
    False, then one per SCORE=VALUE of `mins` / `maxs`, on the tasks the score's scorer judges
    (a signal score: every task). Checked by `check_rules`: e.g. --min snr=15 (the score is
    snr_db) must not silently do nothing."""
    scorers = tuple(model_scorer_spec(item) for item in model_scorers)
    tasks_of = {s.name or s.kind: s.tasks for s in scorers}
    rules = list(DEFAULT_RULES) if default_rules else []
    for option, bound, items in (("--min", "min_value", mins), ("--max", "max_value", maxs)):
        rules += [
            QualityRule(scorer=name, tasks=tasks_of.get(name, TASKS), **{bound: value})
            for name, value in parse_pairs(items, option=option, metavar="SCORE=VALUE", cast=float)
        ]
    cfg = QualityConfig(rules=tuple(rules), model_scorers=scorers)
    check_rules(cfg)
    return cfg


def balance_config(*, targets: Sequence[str] = (), total: int | None = None, seed: int = 0) -> BalanceConfig:
    """Explicit rows per task (TASK=ROWS, each task at most once) or an equal split of `total`."""
    pairs = parse_pairs(targets, option="--target", metavar="TASK=ROWS", cast=int)
    tasks = [task for task, _ in pairs]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise PreprocessConfigError(f"--target names unknown tasks {unknown}; tasks are {', '.join(TASKS)}")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise PreprocessConfigError(f"--target names {twice} more than once: give each task one TASK=ROWS")
    if any(rows < 0 for _, rows in pairs) or (total is not None and total < 0):
        raise PreprocessConfigError("--target ROWS and --balance-total must be >= 0")
    return BalanceConfig(targets=pairs, total=total, seed=seed)


def preprocess_config(
    *,
    tokenizer: str,
    dac_path: str | None = None,
    encode_actors: int = EncodeConfig.actors,
    threads_per_actor: int = EncodeConfig.threads_per_actor,
    batch_rows: int = EncodeConfig.batch_rows,
    max_encode_error_fraction: float = EncodeConfig.max_error_fraction,
    music_window_s: float = AudioConfig.music_window_s,
    min_duration_s: float = AudioConfig.min_duration_s,
    video_fps: float = VideoConfig.fps,
    model_scorers: Sequence[str] = (),
    mins: Sequence[str] = (),
    maxs: Sequence[str] = (),
    default_rules: bool = True,
    targets: Sequence[str] = (),
    balance_total: int | None = None,
    seed: int = BalanceConfig.seed,
    rows_per_shard: int = PreprocessConfig.rows_per_shard,
) -> PreprocessConfig:
    """The PreprocessConfig of the preprocess job's options (one keyword per flag, e.g.
    --encode-actors → encode_actors), checked before any work: PreprocessConfigError (a
    ValueError) names the option at fault."""
    return PreprocessConfig(
        tokenizer_path=tokenizer,
        audio=AudioConfig(music_window_s=music_window_s, min_duration_s=min_duration_s),
        video=VideoConfig(fps=video_fps),
        encode=EncodeConfig(
            dac_path=dac_path,
            actors=encode_actors,
            threads_per_actor=threads_per_actor,
            batch_rows=batch_rows,
            max_error_fraction=max_encode_error_fraction,
        ),
        quality=quality_config(model_scorers=model_scorers, mins=mins, maxs=maxs, default_rules=default_rules),
        balance=balance_config(targets=targets, total=balance_total, seed=seed),
        rows_per_shard=rows_per_shard,
    )
