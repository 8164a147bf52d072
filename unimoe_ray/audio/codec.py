"""The DAC 16 kHz audio codec (descript-audio-codec): waveform <-> discrete codes.

UniMoE-Audio models audio as DAC 16 kHz codes (docs/DESIGN.md §1): 12 residual codebooks of 1024
codes, one frame per 320 samples = 50 frames/s. The language model sees these codes (plus
eos/pad/bos ids 1024-1026 of its own, which never reach the codec).

Weights only ever come from a local file (no hub downloads at run time): `DACCodec.load` reads
the released `weights_16khz.pth` or anything `DACCodec.save` wrote; `DACCodec.random` builds a
small random-weight codec with the same code layout for tests and demos.

Shape legend: B batch, K codebooks, T frames, N samples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unimoe_ray.audio.io import resample

try:
    import dac
except ImportError as _err:  # the codec installs in a second step (README "Installing by hand")
    raise ImportError(
        f"the DAC codec package is not importable ({_err}): install it with "
        "`pip install --no-deps descript-audio-codec==1.0.0 descript-audiotools==0.7.2 torchaudio` "
        "after `pip install -e '.[codec]'` (or run scripts/setup_venv.sh)"
    ) from _err

DAC_PATH_ENV = "UNIMOE_DAC_PATH"

# The codec UniMoE-Audio was trained with; any checkpoint we load must match it.
_SAMPLE_RATE = 16000
_N_CODEBOOKS = 12
_CODEBOOK_SIZE = 1024
# Samples per frame: the product of the encoder strides (the released 16 kHz DAC's and the
# random one's below alike), so FRAME_RATE frames per second. Code that needs the rate before a
# codec is loaded (request limits, durations of stored codes) reads it here; with a codec at
# hand, `DACCodec.frame_rate` says the same.
HOP_LENGTH = 320
FRAME_RATE = _SAMPLE_RATE // HOP_LENGTH  # 50

# Small architecture with the real code layout (hop 2*4*4*10 = 320, 12 x 1024 codes): 2.2M
# parameters, ~25 ms per second of audio on CPU. Even strides only: odd ones shorten the
# decoded signal (docs/DESIGN.md §5).
_RANDOM_DAC_KWARGS = dict(
    encoder_dim=16,
    encoder_rates=[2, 4, 4, 10],  # product: HOP_LENGTH
    decoder_dim=128,
    decoder_rates=[10, 4, 4, 2],
    n_codebooks=_N_CODEBOOKS,
    codebook_size=_CODEBOOK_SIZE,
    sample_rate=_SAMPLE_RATE,
)

_HOW_TO_GET_WEIGHTS = (
    "Get the DAC 16 kHz weights on a machine with internet: "
    "`python -m dac download --model_type 16khz` (it writes "
    "~/.cache/descript/dac/weights_16khz_8kbps_0.0.5.pth), then copy that .pth here and pass "
    f"its path as `path=` or set {DAC_PATH_ENV}."
)


class DACCodec:
    """DAC 16 kHz wrapped for UniMoE-Audio: float waveforms in, (K, T) int64 codes out, back.

    Example:
        >>> codec = DACCodec.random(seed=0)
        >>> codes_KT = codec.encode(np.zeros(16000, np.float32), 16000)   # (12, 50)
        >>> codec.decode(codes_KT).shape                                   # (16000,)
    """

    def __init__(self, model: dac.DAC):
        _check_layout(model)
        self.model = model.eval()

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> DACCodec:
        """Load a DAC checkpoint from a local file; never downloads.

        Args:
            path: a `.pth` written by `dac` (the released weights_16khz.pth) or by `save`.
                Defaults to the environment variable `UNIMOE_DAC_PATH`.
            device: where the model runs.

        Raises:
            FileNotFoundError: no path given, or the file does not exist.
            ValueError: the checkpoint is not a 16 kHz, 12 x 1024-code DAC.
        """
        if path is None:
            path = os.environ.get(DAC_PATH_ENV)
        if not path:
            raise FileNotFoundError(
                f"No DAC checkpoint given: pass DACCodec.load(path=...) or set {DAC_PATH_ENV}. " + _HOW_TO_GET_WEIGHTS
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DAC checkpoint {path} does not exist. " + _HOW_TO_GET_WEIGHTS)
        return cls(dac.DAC.load(str(path)).to(device))

    @classmethod
    def random(cls, seed: int = 0, device: str | torch.device = "cpu") -> DACCodec:
        """A small random-weight DAC with the real code layout; the same seed gives the same
        weights. Leaves the global torch RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = dac.DAC(**_RANDOM_DAC_KWARGS)
        return cls(model.to(device))

    def save(self, path: str | Path) -> Path:
        """Write the weights in DAC's own checkpoint format (state dict + constructor kwargs,
        as the released weights), so `load` reads ours and the real one the same way."""
        path = Path(path)
        self.model.save(str(path), package=False)
        return path

    @property
    def sample_rate(self) -> int:
        return int(self.model.sample_rate)

    @property
    def n_codebooks(self) -> int:
        return int(self.model.n_codebooks)

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)

    @property
    def hop_length(self) -> int:
        """Samples per frame (320)."""
        return int(self.model.hop_length)

    @property
    def frame_rate(self) -> int:
        """Frames per second (50)."""
        return self.sample_rate // self.hop_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_frames(self, num_samples: int) -> int:
        """T for a signal of `num_samples` at the codec rate: the last partial frame counts."""
        return math.ceil(num_samples / self.hop_length)

    @torch.inference_mode()
    def encode(self, wav: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Encode one mono signal.

        Args:
            wav: float signal of shape (N,) in [-1, 1], at `sample_rate`.
            sample_rate: resampled to 16 kHz first when different.

        Returns:
            int64 codes of shape (K, T), on CPU, T = ceil(N_16k / hop).
        """
        return self.encode_batch([wav], sample_rate)[0]

    @torch.inference_mode()
    def encode_batch(
        self, wavs: Sequence[np.ndarray | torch.Tensor], sample_rate: int, batch_size: int = 16
    ) -> list[torch.Tensor]:
        """Encode several mono signals, `batch_size` at a time, shortest with shortest.

        Items are sorted by length so each forward pads little; each is zero-padded to the
        longest in its batch and its codes are trimmed back to its own T_i.

        Codes match `encode` exactly except possibly in an item's last few frames (its end lies
        within the encoder's right context, ~8 frames): alone, the encoder's convolutions pad
        the item's features with zeros past its end; in a batch they see features of the zero
        padding instead. The longest item of each batch is always identical to `encode`.

        Args:
            wavs: float signals of shape (N_i,), all at `sample_rate`.
            sample_rate: resampled to 16 kHz first when different.
            batch_size: signals per encoder forward.

        Returns:
            int64 codes (K, T_i) per input, in input order, on CPU.
        """
        wavs_N = [self._to_codec_rate(wav, sample_rate) for wav in wavs]
        order = sorted(range(len(wavs_N)), key=lambda i: wavs_N[i].numel())
        codes: list[torch.Tensor | None] = [None] * len(wavs_N)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, codes_KT in zip(batch, self._encode_padded([wavs_N[i] for i in batch])):
                codes[i] = codes_KT
        return codes

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """Decode codes back to a waveform.

        Args:
            codes: integer codes of shape (K, T) or (B, K, T), each in [0, codebook_size).

        Returns:
            float32 waveform of shape (N,) or (B, N), N = T * hop, at 16 kHz.

        Raises:
            ValueError: wrong shape or codebook count, or codes outside [0, codebook_size)
                (e.g. the language model's eos/pad/bos ids left in).
        """
        codes_BKT = self._check_codes(torch.as_tensor(codes))
        single = codes_BKT.ndim == 2
        if single:
            codes_BKT = codes_BKT[None]
        batch, _, frames = codes_BKT.shape
        if frames == 0:
            wav_BN = np.zeros((batch, 0), dtype=np.float32)
        else:
            z_BDT = self.model.quantizer.from_codes(codes_BKT.to(self.device, torch.long))[0]
            wav_BN = self.model.decode(z_BDT)[:, 0].float().cpu().numpy()
        return wav_BN[0] if single else wav_BN

    def _to_codec_rate(self, wav: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """(N,) float signal at `sample_rate` -> (N_16k,) float32 tensor at the codec rate."""
        if isinstance(wav, torch.Tensor):
            wav = wav.detach().cpu().numpy()
        wav_N = np.asarray(wav, dtype=np.float32)
        if wav_N.ndim != 1:
            raise ValueError(f"expected a 1-D mono signal, got shape {wav_N.shape}")
        if wav_N.size == 0:
            raise ValueError("cannot encode an empty signal (0 samples)")
        # A copy: arrays arriving through Ray's object store are read-only.
        return torch.tensor(resample(wav_N, sample_rate, self.sample_rate))

    def _encode_padded(self, wavs_N: list[torch.Tensor]) -> list[torch.Tensor]:
        """One encoder forward over signals at the codec rate -> (K, T_i) codes each."""
        frames = [self.num_frames(wav_N.numel()) for wav_N in wavs_N]
        padded_len = max(frames) * self.hop_length
        wav_B1N = torch.zeros(len(wavs_N), 1, padded_len)
        for row, wav_N in enumerate(wavs_N):
            wav_B1N[row, 0, : wav_N.numel()] = wav_N
        _, codes_BKT, *_ = self.model.encode(wav_B1N.to(self.device))
        codes_BKT = codes_BKT.long().cpu()
        return [codes_BKT[row, :, :t] for row, t in enumerate(frames)]

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Reject codes the quantizer would mis-read, before they reach its embedding lookups."""
        if codes.ndim not in (2, 3):
            raise ValueError(f"codes must be (K, T) or (B, K, T), got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.shape[-2] != self.n_codebooks:
            raise ValueError(
                f"expected {self.n_codebooks} codebooks, got {codes.shape[-2]} (codes shape {tuple(codes.shape)})"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]: strip delay-pattern specials "
                "first (DelayPattern.revert)"
            )
        return codes


def _check_layout(model: dac.DAC) -> None:
    """UniMoE-Audio's vocab and frame rate are built on 16 kHz DAC with 12 x 1024 codes."""
    layout = (int(model.sample_rate), int(model.n_codebooks), int(model.codebook_size))
    if layout != (_SAMPLE_RATE, _N_CODEBOOKS, _CODEBOOK_SIZE):
        raise ValueError(
            f"expected a {_SAMPLE_RATE} Hz DAC with {_N_CODEBOOKS} codebooks of "
            f"{_CODEBOOK_SIZE} codes, got {layout[0]} Hz, {layout[1]} x {layout[2]}"
        )
