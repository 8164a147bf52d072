"""Model-based judges of generated audio, each loaded from a local path (never a download) and
each optional: a judge whose weights are not given is skipped, and the reason is reported.

    asr      a Whisper-family folder (transformers' "automatic-speech-recognition" pipeline):
             WER (English) / CER (Mandarin) as Seed-TTS-eval scores them
    speaker  a speaker-embedding folder (transformers AutoModelForAudioXVector, e.g. a
             WavLM-for-XVector): speaker similarity = cosine(prompt voice, output)
    utmos    a TorchScript / pickled module file (unimoe_ray.data.quality.TorchModuleScorer,
             the contract data governance uses): predicted MOS
    clap     a CLAP folder (transformers ClapModel + ClapProcessor): CLAP score =
             cosine(caption, audio); its audio embeddings also give FAD

Seed-TTS-eval judges speech at 16 kHz; CLAP at its feature extractor's rate (48 kHz for
LAION's checkpoints). Clips are resampled to each judge's rate here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unimoe_ray.audio.io import resample

# Seed-TTS-eval turns Mandarin hypotheses into simplified characters (zhconv) before the CER;
# a Whisper model may answer in traditional ones. Without the package that step is left out
# and the report says so.
SIMPLIFIES_ZH = importlib.util.find_spec("zhconv") is not None


def _folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} model {path}: not a local model folder with config.json (save one with "
            "save_pretrained on a machine that has it; nothing is downloaded here)"
        )
    return path


class AsrJudge:
    """Transcribes 16 kHz speech with a local Whisper-family model through transformers'
    pipeline. A multilingual model is told the language (Seed-TTS-eval forces English for its
    English set); an English-only one is not."""

    sample_rate = 16000

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from transformers import pipeline

        self.path = _folder(path, "ASR")
        self._pipe = pipeline("automatic-speech-recognition", model=str(self.path), device=device)
        gen = getattr(self._pipe.model, "generation_config", None)
        self._multilingual = bool(getattr(gen, "lang_to_id", None))

    def transcribe(self, wav: np.ndarray, sr: int, lang: str) -> str:
        audio = resample(np.asarray(wav, np.float32), sr, self.sample_rate)
        kwargs = {"generate_kwargs": {"language": lang, "task": "transcribe"}} if self._multilingual else {}
        text = str(self._pipe({"raw": audio, "sampling_rate": self.sample_rate}, **kwargs)["text"]).strip()
        if lang == "zh" and SIMPLIFIES_ZH:
            import zhconv

            text = zhconv.convert(text, "zh-cn")  # Seed-TTS-eval: hypotheses in simplified characters
        return text


class SpeakerJudge:
    """Speaker embeddings from a local x-vector model (e.g. WavLM-for-XVector)."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        self.path = _folder(path, "speaker-embedding")
        self._fe = AutoFeatureExtractor.from_pretrained(self.path)
        self._model = AutoModelForAudioXVector.from_pretrained(self.path).to(device).eval()
        self._device = device
        self.sample_rate = int(self._fe.sampling_rate)

    @torch.inference_mode()
    def embed(self, wav: np.ndarray, sr: int) -> np.ndarray:
        audio = resample(np.asarray(wav, np.float32), sr, self.sample_rate)
        x = self._fe(audio, sampling_rate=self.sample_rate, return_tensors="pt").to(self._device)
        return self._model(**x).embeddings[0].float().cpu().numpy()


class ClapJudge:
    """Text and audio embeddings from a local transformers CLAP folder. Audio longer than the
    feature extractor's window is cut into windows that each fit it and their embeddings are
    averaged (as fadtk embeds long clips): the extractor's own handling of long input crops at
    random, and a score must not depend on a random crop."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from transformers import ClapModel, ClapProcessor

        self.path = _folder(path, "CLAP")
        self._proc = ClapProcessor.from_pretrained(self.path)
        self._model = ClapModel.from_pretrained(self.path).to(device).eval()
        self._device = device
        fe = self._proc.feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self._window = int(fe.nb_max_samples)

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers ≥ 5 returns an output object whose pooler_output is the projected,
        # normalised embedding; older versions return that tensor itself.
        return getattr(out, "pooler_output", out)

    @torch.inference_mode()
    def audio_embed(self, wav: np.ndarray, sr: int) -> np.ndarray:
        audio = resample(np.asarray(wav, np.float32), sr, self.sample_rate)
        if audio.size == 0:
            raise ValueError("CLAP cannot embed an empty clip")
        windows = [audio[i : i + self._window] for i in range(0, audio.size, self._window)]
        x = self._proc.feature_extractor(windows, sampling_rate=self.sample_rate, return_tensors="pt").to(self._device)
        emb_WD = self._pooled(self._model.get_audio_features(**x)).float()
        return torch.nn.functional.normalize(emb_WD.mean(0), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def text_embed(self, text: str) -> np.ndarray:
        x = self._proc.tokenizer([text], return_tensors="pt", padding=True).to(self._device)
        return self._pooled(self._model.get_text_features(**x))[0].float().cpu().numpy()


@dataclass
class Judges:
    """The judges this run has, and why each missing one is missing."""

    asr: AsrJudge | None = None
    speaker: SpeakerJudge | None = None
    utmos: object | None = None  # unimoe_ray.data.quality.TorchModuleScorer
    clap: ClapJudge | None = None
    skipped: dict[str, str] = field(default_factory=dict)


# metric → (judge, flag that supplies its weights)
MODEL_METRICS = {
    "wer": ("asr", "--asr-model"),
    "cer": ("asr", "--asr-model"),
    "speaker_sim": ("speaker", "--speaker-model"),
    "utmos": ("utmos", "--utmos-model"),
    "clap_score": ("clap", "--clap-model"),
    "fad": ("clap", "--clap-model"),
}


def load_judges(
    *,
    asr: str | None = None,
    speaker: str | None = None,
    utmos: str | None = None,
    clap: str | None = None,
    device: str = "cpu",
) -> Judges:
    """Load the judges whose paths are given. A path that is given but unusable is an error
    (FileNotFoundError naming it); a path not given skips its metrics, with the reason."""
    from unimoe_ray.data.quality import TorchModuleScorer

    j = Judges()
    paths = {"asr": asr, "speaker": speaker, "utmos": utmos, "clap": clap}
    if asr:
        j.asr = AsrJudge(asr, device)
    if speaker:
        j.speaker = SpeakerJudge(speaker, device)
    if utmos:
        j.utmos = TorchModuleScorer("utmos", utmos)
    if clap:
        j.clap = ClapJudge(clap, device)
    for metric, (judge, flag) in MODEL_METRICS.items():
        if not paths[judge]:
            j.skipped[metric] = f"no {flag} given (weights load from a local path only)"
    return j
