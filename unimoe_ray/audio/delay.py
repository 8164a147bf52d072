"""The codebook delay pattern (docs/DESIGN.md §1): codebook c at step s carries frame s − delay[c].

Worked example, T = 2 frames (a, b), delays [0, 2], B=bos, E=eos, P=pad:

    frames (K, T)        apply() → (K, S), S = T + max(delay) + 1 = 5
    c0: a0 b0            c0: a0 b0 E  P  P
    c1: a1 b1            c1: B  B  a1 b1 E

so `apply` returns T + max(delay) + 1 steps, every codebook's last real frame followed by its
EOS at step T + delay[c], BOS before its first frame and PAD after its EOS. `revert` undoes it.
In generation, EOS on codebook 0 at step T starts a countdown: at step T + j codebook c writes
EOS if j == delay[c], PAD if j > delay[c]; the sequence is complete at j = max(delay).

Shape legend: K codebooks, T frames, S steps (T + max_delay + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DelayPattern:
    delays: tuple[int, ...]
    bos: int = 1026
    eos: int = 1024
    pad: int = 1025

    def __post_init__(self) -> None:
        if not self.delays or self.delays[0] != 0 or any(d < 0 for d in self.delays):
            raise ValueError(f"delays {self.delays}: must be non-empty, start at 0, be non-negative")

    @property
    def num_codebooks(self) -> int:
        return len(self.delays)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def codebook_size(self) -> int:
        return min(self.bos, self.eos, self.pad)

    def _check_codes(self, codes_KT: torch.Tensor) -> None:
        if codes_KT.dim() != 2 or codes_KT.shape[0] != self.num_codebooks:
            raise ValueError(f"codes must be ({self.num_codebooks} codebooks, frames); got {tuple(codes_KT.shape)}")
        if codes_KT.numel() and (codes_KT.min() < 0 or codes_KT.max() >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}) before the delay pattern is applied")

    def apply(self, codes_KT: torch.Tensor) -> torch.Tensor:
        """(K, T) frames → (K, T + max_delay + 1) delayed steps with bos / eos / pad."""
        self._check_codes(codes_KT)
        K, T = codes_KT.shape
        S = T + self.max_delay + 1
        out_KS = torch.full((K, S), self.pad, dtype=codes_KT.dtype, device=codes_KT.device)
        for c, d in enumerate(self.delays):
            out_KS[c, :d] = self.bos
            out_KS[c, d : d + T] = codes_KT[c]
            out_KS[c, d + T] = self.eos
        return out_KS

    def voice_prompt(self, codes_KT: torch.Tensor) -> torch.Tensor:
        """The released layout of a voice prompt's codes, one placeholder per step:
        (K, T) → (K, T + max_delay + 1) with BOS for delay[c] + 1 steps, the codes, EOS, then
        PAD — `apply` shifted one step right behind a BOS column (so the last codebook's EOS
        falls just past the end, as in the released `_preprocess_codec`).

        Worked example, T = 2 (a, b), delays [0, 2]:  c0: B a0 b0 E P   c1: B B B a1 b1
        """
        delayed_KS = self.apply(codes_KT)
        bos_K1 = torch.full_like(delayed_KS[:, :1], self.bos)
        return torch.cat([bos_K1, delayed_KS[:, :-1]], dim=1)

    def revert(self, delayed_KS: torch.Tensor) -> torch.Tensor:
        """(K, S) delayed steps → (K, T) frames, T = S − max_delay − 1."""
        if delayed_KS.dim() != 2 or delayed_KS.shape[0] != self.num_codebooks:
            raise ValueError(f"delayed codes must be ({self.num_codebooks}, steps); got {tuple(delayed_KS.shape)}")
        T = delayed_KS.shape[1] - self.max_delay - 1
        if T < 0:
            raise ValueError(f"{delayed_KS.shape[1]} steps is shorter than the pattern's {self.max_delay + 1}")
        codes_KT = torch.stack([delayed_KS[c, d : d + T] for c, d in enumerate(self.delays)])
        if codes_KT.numel() and codes_KT.max() >= self.codebook_size:
            raise ValueError("delayed codes hold a bos/eos/pad inside the frame span: not a valid pattern")
        return codes_KT

    def labels(self, delayed_KS: torch.Tensor) -> torch.Tensor:
        """Training targets: the delayed steps with BOS fill and PAD masked to IGNORE_INDEX
        (they are fixed by the pattern, not predicted); EOS stays a target."""
        fixed = (delayed_KS == self.bos) | (delayed_KS == self.pad)
        return delayed_KS.masked_fill(fixed, IGNORE_INDEX)

    def forced_token(self, step_after_eos: int, codebook: int) -> int | None:
        """During the EOS countdown: what codebook c must emit `j` steps after codebook 0's
        EOS (None = still sampling its last real frames)."""
        d = self.delays[codebook]
        if step_after_eos < d:
            return None
        return self.eos if step_after_eos == d else self.pad
