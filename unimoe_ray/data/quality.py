"""Quality scorers for data governance (paper §4.1): one interface, offline signal scorers, and
model-based scorers loaded from local files.

The paper filters speech by a perceptual-quality score (UTMOS) and music by an aesthetic score
(Audiobox-Aesthetics) and text-audio similarity (CLAP). Their weights cannot be downloaded here,
so the defaults are signal measures that need no weights (SNR estimate, clipping, silence);
the model scorers load from a path when one is given. No Ray in this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from unimoe_ray.data.config import ModelScorerSpec, QualityRule

_FRAME_S = 0.02  # 20 ms analysis frames: one phoneme-ish, a few pitch periods


@runtime_checkable
class Scorer(Protocol):
    """Maps one clip (and its text, if any) to a float; higher is not necessarily better."""

    name: str

    def score(self, wav: np.ndarray, sr: int, text: str | None = None) -> float: ...


def _frame_energy(wav: np.ndarray, sr: int) -> np.ndarray:
    """Mean-square energy of non-overlapping 20 ms frames, float64 (F,)."""
    hop = max(1, int(sr * _FRAME_S))
    n_frames = max(1, len(wav) // hop)
    x = np.asarray(wav[: n_frames * hop], np.float64)
    if x.size < hop:  # shorter than one frame: one partial frame
        return np.array([np.mean(np.square(np.asarray(wav, np.float64))) if len(wav) else 0.0])
    return np.mean(np.square(x.reshape(n_frames, hop)), axis=1)


class SnrScorer:
    """Blind SNR estimate in dB: loud frames (90th percentile energy) over the noise floor
    (10th percentile). Speech has pauses, so its quiet frames show the noise floor; clean
    synthetic speech has digital silence there and scores the ceiling, 100 dB."""

    name = "snr_db"

    def score(self, wav: np.ndarray, sr: int, text: str | None = None) -> float:
        energy_F = _frame_energy(wav, sr)
        signal, noise = np.percentile(energy_F, 90), np.percentile(energy_F, 10)
        if signal <= 0:
            return 0.0
        return float(np.clip(10 * math.log10(signal / max(noise, 1e-12)), 0.0, 100.0))


class ClippingScorer:
    """Fraction of samples at or beyond 0.99 full scale: a clipped recording spends whole runs
    of samples there, a healthy one touches it only at isolated peaks."""

    name = "clipping_ratio"

    def score(self, wav: np.ndarray, sr: int, text: str | None = None) -> float:
        if len(wav) == 0:
            return 0.0
        return float(np.mean(np.abs(wav) >= 0.99))


class SilenceScorer:
    """Fraction of 20 ms frames quieter than -40 dB below the loudest frame (or -60 dBFS,
    whichever is louder): relative, so a quiet but clean recording is not called silent."""

    name = "silence_ratio"

    def score(self, wav: np.ndarray, sr: int, text: str | None = None) -> float:
        rms_F = np.sqrt(_frame_energy(wav, sr))
        threshold = max(1e-3, 1e-2 * float(rms_F.max(initial=0.0)))
        return float(np.mean(rms_F < threshold))


def signal_scorers() -> tuple[Scorer, ...]:
    """The offline defaults, in a fixed order; their names (config.SIGNAL_SCORES) become shard columns."""
    return (SnrScorer(), ClippingScorer(), SilenceScorer())


class TorchModuleScorer:
    """A model exported as TorchScript (torch.jit.save) or a whole pickled nn.Module
    (torch.save), e.g. UTMOS or Audiobox-Aesthetics.

    Contract: module(wav_BN float32 at `sample_rate`) -> scores of shape (B,) or (B, k); with k
    outputs (Audiobox gives CE, CU, PC, PQ) `output_index` picks one.
    """

    def __init__(self, name: str, path: str | Path, sample_rate: int = 16000, output_index: int | None = None):
        import torch  # lazy: only model scorers need it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{name} scorer weights {path} do not exist: export the model with "
                "torch.jit.save (or torch.save of the nn.Module) and pass that file"
            )
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError:  # not TorchScript: a pickled module (trusted local file)
            module = torch.load(str(path), map_location="cpu", weights_only=False)
        self.name, self.sample_rate, self.output_index = name, sample_rate, output_index
        self._torch, self._module = torch, module.eval()

    def score(self, wav: np.ndarray, sr: int, text: str | None = None) -> float:
        from unimoe_ray.audio.io import resample

        wav_N = resample(np.asarray(wav, np.float32), sr, self.sample_rate)
        with self._torch.inference_mode():
            out = self._module(self._torch.from_numpy(wav_N)[None]).float().reshape(-1)
        return float(out[self.output_index or 0])


class ClapScorer:
    """Text-audio cosine similarity from a LAION-CLAP checkpoint on disk (48 kHz audio).

    Needs the `laion_clap` package; its text branch also needs the `roberta-base` tokenizer in
    the local Hugging Face cache (set HF_HUB_OFFLINE=1 to make sure nothing is fetched).
    """

    name = "clap"

    def __init__(self, path: str | Path, name: str = "clap", amodel: str = "HTSAT-base"):
        path = Path(path)
        try:
            import laion_clap
        except ImportError as err:
            raise ImportError(f"CLAP scoring ({path}) needs the laion_clap package: pip install laion-clap") from err
        if not path.is_file():
            raise FileNotFoundError(f"CLAP checkpoint {path} does not exist")
        self.name = name
        self._model = laion_clap.CLAP_Module(enable_fusion=False, amodel=amodel)
        self._model.load_ckpt(str(path))

    def score(self, wav: np.ndarray, sr: int, text: str | None = None) -> float:
        from unimoe_ray.audio.io import resample

        if not text:
            return float("nan")
        wav_48k = resample(np.asarray(wav, np.float32), sr, 48000)[None]
        audio_D = self._model.get_audio_embedding_from_data(x=wav_48k, use_tensor=False)[0]
        # laion_clap's text branch mis-handles a batch of one; embed the caption twice.
        text_D = self._model.get_text_embedding([text, text], use_tensor=False)[0]
        return float(np.dot(audio_D, text_D) / (np.linalg.norm(audio_D) * np.linalg.norm(text_D)))


def build_model_scorer(spec: ModelScorerSpec) -> Scorer:
    name = spec.name or spec.kind
    if spec.kind in ("utmos", "aesthetics"):
        return TorchModuleScorer(name, spec.path, output_index=spec.output_index)
    if spec.kind == "clap":
        return ClapScorer(spec.path, name=name)
    raise ValueError(f"unknown model scorer kind {spec.kind!r}: use utmos, aesthetics or clap")


def failed_rule(scores: dict[str, float], task: str, rules: tuple[QualityRule, ...]) -> tuple[str, str]:
    """(reason, detail) of the first rule the row breaks, e.g. ("low_snr_db", "snr_db=3.1 <
    15"); ("", "") if it passes. A missing or NaN score passes (the scorer did not apply)."""
    for rule in rules:
        value = scores.get(rule.scorer)
        if task not in rule.tasks or value is None or math.isnan(value):
            continue
        if rule.min_value is not None and value < rule.min_value:
            return f"low_{rule.scorer}", f"{rule.scorer}={value:.4g} < {rule.min_value:g}"
        if rule.max_value is not None and value > rule.max_value:
            return f"high_{rule.scorer}", f"{rule.scorer}={value:.4g} > {rule.max_value:g}"
    return "", ""
