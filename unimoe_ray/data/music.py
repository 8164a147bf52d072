"""Music synthesised from note sequences, with captions the audio actually supports.

For the mini corpus (`mini_corpus.py`): each piece is a melody over I-IV-V-I triads,
rendered with one instrument timbre, optionally over a kick/hat beat. The caption names what a
listener (or a model) can hear: tempo in BPM, the instrument, key and mode estimated from the
notes themselves (Krumhansl-Kessler key profiles), and a mood that follows from mode and tempo.
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Instrument name -> timbre; the names are what the caption says.
INSTRUMENTS = {
    "flute": "sine with vibrato",
    "clarinet": "odd harmonics (square-like)",
    "strings": "all harmonics (sawtooth-like), slow bow attack",
    "guitar": "plucked string (Karplus-Strong)",
    "marimba": "struck bar, fast-decaying partials",
}
# Krumhansl & Kessler (1982) key profiles, tonic first.
_KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
_MOODS = {
    ("major", True): ("happy", "cheerful"),
    ("major", False): ("calm", "peaceful"),
    ("minor", True): ("tense", "dramatic"),
    ("minor", False): ("sad", "melancholic"),
}
FAST_BPM = 110  # at or above: a "fast" piece for the mood


@dataclass(frozen=True)
class Note:
    pitch: int  # MIDI number
    start: float  # beats
    duration: float  # beats
    velocity: float = 1.0


@dataclass(frozen=True)
class Piece:
    melody: tuple[Note, ...]
    bass: tuple[Note, ...]
    bpm: int
    instrument: str
    drums: bool
    n_beats: int

    @property
    def duration_s(self) -> float:
        return self.n_beats * 60.0 / self.bpm


def compose(
    rng: np.random.Generator, *, tonic: int, mode: str, bpm: int, n_bars: int, instrument: str, drums: bool
) -> Piece:
    """A 4/4 melody in (tonic pitch class, mode): chord tones on the beats, scale steps between,
    ending on a long tonic; the accompaniment holds each bar's triad (I-IV-V-I)."""
    scale = [tonic + 60 + s for s in SCALES[mode]]
    scale = [p - 12 for p in scale] + scale + [p + 12 for p in scale]  # 3 octaves around C4
    chords = (0, 3, 4, 0)  # scale degrees of the roots: I IV V I
    rhythms = ((1, 1, 1, 1), (2, 1, 1), (1, 1, 2), (0.5, 0.5, 1, 1, 1), (1.5, 0.5, 2))
    melody, bass = [], []
    pos = 7 + 0  # index into `scale`: the middle octave's tonic
    for bar in range(n_bars):
        root = chords[bar % len(chords)]
        last = bar == n_bars - 1
        rhythm = (4,) if last else rhythms[rng.integers(len(rhythms))]
        beat = 0.0
        for dur in rhythm:
            if last:
                pos = 7  # resolve to the tonic
            elif beat == int(beat):  # on the beat: nearest chord tone of this bar
                tones = [i for i in range(len(scale)) if (i - root) % 7 in (0, 2, 4)]
                pos = min(tones, key=lambda i: (abs(i - pos), rng.random()))
                pos += int(rng.choice((-2, 0, 2))) if rng.random() < 0.3 else 0
            else:
                pos += int(rng.choice((-1, 1)))
            pos = int(np.clip(pos, 3, len(scale) - 4))
            melody.append(Note(scale[pos], bar * 4 + beat, dur, float(rng.uniform(0.7, 1.0))))
            beat += dur
        # The bar's triad (root low, third and fifth above) makes the mode audible.
        bass.append(Note(scale[root] - 24, bar * 4, 4.0, 0.6))
        bass.extend(Note(scale[root + step] - 12, bar * 4, 4.0, 0.3) for step in (2, 4))
    return Piece(tuple(melody), tuple(bass), bpm, instrument, drums, n_bars * 4)


def estimate_key(notes: tuple[Note, ...]) -> tuple[str, str]:
    """(tonic name, "major" | "minor") whose key profile best correlates with the notes'
    duration-weighted pitch-class histogram."""
    hist = np.zeros(12)
    for note in notes:
        hist[note.pitch % 12] += note.duration
    best, best_r = ("C", "major"), -np.inf
    for tonic in range(12):
        for mode, profile in (("major", _KK_MAJOR), ("minor", _KK_MINOR)):
            r = np.corrcoef(hist, np.roll(profile, tonic))[0, 1]
            if r > best_r:
                best, best_r = (NOTE_NAMES[tonic], mode), r
    return best


def caption(piece: Piece, rng: np.random.Generator) -> str:
    """A caption stating tempo, instrument, key/mode and mood (from the notes), drums or not."""
    tonic, mode = estimate_key(piece.melody + piece.bass)
    fast = piece.bpm >= FAST_BPM
    mood = _MOODS[(mode, fast)][rng.integers(2)]
    pace = "fast" if fast else "slow"
    beat = "with a steady drum beat" if piece.drums else "without drums"
    templates = (
        f"A {mood} {pace} {piece.instrument} melody in {tonic} {mode} at {piece.bpm} BPM, {beat}.",
        f"{mood.capitalize()} {piece.instrument} tune in {tonic} {mode}, {piece.bpm} BPM, {beat}.",
        f"{pace.capitalize()} {mood} music played on {piece.instrument}, {tonic} {mode}, {piece.bpm} BPM, {beat}.",
    )
    return templates[rng.integers(len(templates))]


def _midi_hz(pitch: float) -> float:
    return 440.0 * 2 ** ((pitch - 69) / 12)


def _additive(freq: float, t_N: np.ndarray, sr: int, harmonic_amp) -> np.ndarray:
    """Sum of harmonics k*freq below Nyquist with amplitude harmonic_amp(k) (band-limited)."""
    out = np.zeros_like(t_N)
    k = 1
    while k * freq < sr / 2 and k <= 40:
        amp = harmonic_amp(k)
        if amp:
            out += amp * np.sin(2 * np.pi * k * freq * t_N)
        k += 1
    return out


def _karplus_strong(freq: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Plucked string: a noise burst circulating in a delay line of one period through a
    two-tap averaging filter, y[i] = 0.498 (y[i-P] + y[i-P-1]); vectorised a period at a time."""
    period = max(2, int(round(sr / freq)))
    buf = np.zeros(n + period + 1)  # buf[i + 1] = y[i], so y[i - P - 1] exists from the start
    buf[1 : period + 1] = rng.uniform(-1, 1, period)
    for start in range(period + 1, n + 1, period):
        stop = min(start + period, n + 1)
        buf[start:stop] = 0.498 * (buf[start - period : stop - period] + buf[start - period - 1 : stop - period - 1])
    return buf[1 : n + 1]


def _note_wave(note: Note, instrument: str, spb: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(note.duration * spb * sr)
    t_N = np.arange(n) / sr
    freq = _midi_hz(note.pitch)
    if instrument == "flute":
        vib = 1 + 0.003 * np.sin(2 * np.pi * 5 * t_N)
        wave = np.sin(2 * np.pi * freq * np.cumsum(vib) / sr) + 0.1 * np.sin(4 * np.pi * freq * t_N)
        attack = 0.04
    elif instrument == "clarinet":
        wave, attack = _additive(freq, t_N, sr, lambda k: 1 / k if k % 2 else 0), 0.02
    elif instrument == "strings":
        wave, attack = _additive(freq, t_N, sr, lambda k: 1 / k), 0.08
    elif instrument == "guitar":
        wave, attack = _karplus_strong(freq, n, sr, rng), 0.002
    elif instrument == "marimba":
        wave = np.sin(2 * np.pi * freq * t_N) + 0.4 * np.sin(2 * np.pi * 4 * freq * t_N) * np.exp(-t_N * 20)
        wave *= np.exp(-t_N * 4)
        attack = 0.002
    elif instrument == "bass":
        wave, attack = np.sin(2 * np.pi * freq * t_N) + 0.3 * np.sin(4 * np.pi * freq * t_N), 0.02
    else:
        raise ValueError(f"unknown instrument {instrument!r}; known: {sorted(INSTRUMENTS)}")
    # Attack/release ramps stop clicks at note boundaries.
    env = np.minimum(1.0, t_N / attack) * np.minimum(1.0, (n - np.arange(n)) / (0.01 * sr))
    return (note.velocity * wave * env).astype(np.float64)


def _drums(n_beats: int, spb: float, sr: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """Kick (a falling sine) on every beat, hi-hat (a noise tick) half a beat later."""
    kick_t = np.arange(int(0.15 * sr)) / sr
    kick = np.sin(2 * np.pi * (50 * kick_t + 70 * (1 - np.exp(-kick_t * 30)) / 30)) * np.exp(-kick_t * 25)
    hat_n = int(0.03 * sr)
    out = np.zeros(n)
    for beat in range(n_beats):
        hat = np.diff(rng.normal(0, 0.3, hat_n + 1)) * np.exp(-np.arange(hat_n) / (0.008 * sr))
        for offset, hit in ((0.0, kick), (0.5, hat)):
            start = int((beat + offset) * spb * sr)
            stop = min(n, start + len(hit))
            out[start:stop] += hit[: stop - start]
    return out


def render(piece: Piece, sr: int, rng: np.random.Generator, peak: float = 0.8) -> np.ndarray:
    """Piece -> float32 mono waveform of piece.duration_s seconds, peak-normalised to `peak`.

    Layers are levelled before mixing (melody 1, triads 0.4, drums 0.8 of their own peaks), so
    the beat stays audible whatever the instrument's harmonic content.
    """
    spb = 60.0 / piece.bpm
    n = int(round(piece.duration_s * sr))

    def layer(notes: tuple[Note, ...], instrument: str) -> np.ndarray:
        out = np.zeros(n)
        for note in notes:
            wave = _note_wave(note, instrument, spb, sr, rng)
            start = int(round(note.start * spb * sr))
            stop = min(n, start + len(wave))
            out[start:stop] += wave[: stop - start]
        return out / max(np.abs(out).max(), 1e-9)

    mix = layer(piece.melody, piece.instrument) + 0.4 * layer(piece.bass, "bass")
    if piece.drums:
        drums = _drums(piece.n_beats, spb, sr, rng, n)
        mix += 0.8 * drums / max(np.abs(drums).max(), 1e-9)
    return (peak * mix / max(np.abs(mix).max(), 1e-9)).astype(np.float32)
