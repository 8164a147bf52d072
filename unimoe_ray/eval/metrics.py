"""The arithmetic of the evaluation metrics, on plain tensors, arrays and strings (no models, no
files), so that each one can be checked by hand.

- teacher-forced per-codebook cross-entropy and accuracy (the training loss's CE, per codebook);
- duration error of a generation against the length it was asked for, and whether it ended
  by EOS or by the length limit;
- Seed-TTS-eval's text normalisation and per-utterance WER (English) / CER (Mandarin);
- cosine similarity (speaker similarity, CLAP score) and the Fréchet distance between two
  Gaussians fitted to embeddings (FAD).

Shape legend: T labelled positions, K codebooks, V codec vocab, N clips, D embedding dim.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unimoe_ray.model.unimoe_audio import IGNORE_INDEX

# ---- teacher forcing ----


@dataclass
class CodebookTally:
    """Per-codebook sums over labelled positions: CE (nats), correct argmax, label count."""

    ce_sum_K: torch.Tensor
    correct_K: torch.Tensor
    count_K: torch.Tensor

    @classmethod
    def empty(cls, num_codebooks: int) -> "CodebookTally":
        z = torch.zeros(num_codebooks, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def add(self, other: "CodebookTally") -> None:
        self.ce_sum_K += other.ce_sum_K
        self.correct_K += other.correct_K
        self.count_K += other.count_K

    def summary(self) -> dict:
        """ce: Σ_k mean CE_k (the CE term of the training loss); accuracy: mean over codebooks
        of each codebook's top-1 accuracy; per-codebook lists beside them."""
        n_K = self.count_K.clamp_min(1.0)
        ce_K, acc_K = self.ce_sum_K / n_K, self.correct_K / n_K
        return {
            "ce": float(ce_K.sum()),
            "accuracy": float(acc_K.mean()),
            "ce_per_codebook": [round(float(v), 6) for v in ce_K],
            "accuracy_per_codebook": [round(float(v), 6) for v in acc_K],
            "label_tokens": int(self.count_K[0]),
        }


def codebook_tally(logits_TKV: torch.Tensor, labels_TK: torch.Tensor) -> CodebookTally:
    """CE sums, correct top-1 counts and label counts per codebook; IGNORE_INDEX labels do not
    count. Ties in the argmax go to the lower code (torch.argmax)."""
    T, K, V = logits_TKV.shape
    if labels_TK.shape != (T, K):
        raise ValueError(f"labels {tuple(labels_TK.shape)} do not match logits {(T, K, V)}")
    valid_TK = labels_TK != IGNORE_INDEX
    ce_TK = F.cross_entropy(
        logits_TKV.float().reshape(-1, V), labels_TK.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(T, K)
    correct_TK = (logits_TKV.argmax(-1) == labels_TK) & valid_TK
    return CodebookTally(
        ce_sum_K=ce_TK.double().sum(0).cpu(),
        correct_K=correct_TK.double().sum(0).cpu(),
        count_K=valid_TK.double().sum(0).cpu(),
    )


# ---- generation length ----


def ended_by_eos(frames: int, frame_limit: int) -> bool:
    """A generation ended by EOS when it stopped before its frame limit: at the limit the
    decoder forces EOS itself (inference/sampling.py `apply_pattern_rules`), so frames ==
    limit means the model never chose to stop."""
    return frames < frame_limit


def duration_error(frames: int, requested_frames: int, frame_rate: float) -> dict:
    """Generated length against the requested one: signed seconds (+ too long), absolute
    seconds, and the relative error |frames − requested| / requested."""
    if requested_frames <= 0:
        raise ValueError(f"requested length {requested_frames} frames: must be > 0")
    diff = frames - requested_frames
    return {"signed_s": diff / frame_rate, "abs_s": abs(diff) / frame_rate, "rel": abs(diff) / requested_frames}


def eos_rate(frames: list[int], frame_limits: list[int]) -> float:
    """Fraction of generations that ended by EOS, not by the length limit."""
    if len(frames) != len(frame_limits) or not frames:
        raise ValueError("eos_rate needs one frame limit per generation, and at least one generation")
    return sum(ended_by_eos(f, lim) for f, lim in zip(frames, frame_limits)) / len(frames)


# ---- WER / CER as Seed-TTS-eval computes them ----

# zhon.hanzi.punctuation (zhon 2.x), which Seed-TTS-eval strips together with
# string.punctuation; written out here so the score needs no extra package.
ZH_PUNCTUATION = (
    "\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d"
    "\uff0f\uff1a\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f"
    "\uff40\uff5b\uff5c\uff5d\uff5e\uff5f\uff60\uff62\uff63\uff64\u3000\u3001\u3003"
    "\u3008\u3009\u300a\u300b\u300c\u300d\u300e\u300f\u3010\u3011"
    "\u3014\u3015\u3016\u3017\u3018\u3019\u301a\u301b\u301c\u301d\u301e\u301f"
    "\u3030\u303e\u303f\u2013\u2014\u2018\u2019\u201b\u201c\u201d\u201e\u201f"
    "\u2026\u2027\ufe4f\ufe51\ufe54\u00b7"
    "\uff0e\uff01\uff1f\uff61\u3002"
)
_PUNCTUATION = ZH_PUNCTUATION + string.punctuation


def seed_tts_normalize(text: str, lang: str) -> str:
    """Seed-TTS-eval's `process_one`: drop Chinese and ASCII punctuation except the
    apostrophe, turn double spaces into single ones; then zh: one token per character
    (spaced); en: lower case."""
    for ch in _PUNCTUATION:
        if ch != "'":
            text = text.replace(ch, "")
    text = text.replace("  ", " ")
    if lang == "zh":
        return " ".join(text)
    if lang == "en":
        return text.lower()
    raise ValueError(f"language {lang!r}: Seed-TTS-eval defines WER for 'en' and CER for 'zh'")


def utterance_error_rate(reference: str, hypothesis: str, lang: str) -> float:
    """WER (en) or CER (zh, the WER over characters) of one utterance, Seed-TTS-eval style;
    a corpus score is the mean of these (Seed-TTS-eval `average_wer.py`)."""
    import jiwer

    ref, hyp = seed_tts_normalize(reference, lang), seed_tts_normalize(hypothesis, lang)
    if not ref.strip():
        raise ValueError(f"reference text {reference!r} is empty after normalisation: nothing to score against")
    return float(jiwer.process_words(ref, hyp).wer)


# ---- embeddings ----


def cosine(a_D: np.ndarray, b_D: np.ndarray) -> float:
    a, b = np.asarray(a_D, np.float64).ravel(), np.asarray(b_D, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def gaussian_stats(emb_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of N embeddings, as FAD fits them (N ≥ 2)."""
    x = np.asarray(emb_ND, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"FAD needs at least 2 embeddings of shape (N, D); got {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1_D: np.ndarray, sigma1_DD: np.ndarray, mu2_D: np.ndarray, sigma2_DD: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (Fréchet distance of two Gaussians; FAD, fadtk and
    pytorch-fid compute it so). Where the product is singular (fewer clips than dimensions)
    and its square root not finite, ε·I is added to both covariances, as they do."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1_D).astype(np.float64), np.atleast_1d(mu2_D).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1_DD).astype(np.float64), np.atleast_2d(sigma2_DD).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"FAD statistics do not match: means {mu1.shape}/{mu2.shape}, covariances {s1.shape}/{s2.shape}"
        )
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.size) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fad(emb1_ND: np.ndarray, emb2_MD: np.ndarray) -> float:
    """Fréchet audio distance between two sets of clip embeddings."""
    return frechet_distance(*gaussian_stats(emb1_ND), *gaussian_stats(emb2_MD))
