"""The step-by-step decode engine behind serving: continuous batching over KV-cache slots.

`generate` (inference/generate.py) decodes a fixed batch from start to end. The engine instead
holds a *running batch* of rows that changes between steps:

- a request's prompt (and its negative prompt, for classifier-free guidance) is prefilled on
  its own, exactly as `generate([prompt], [negative])` would, and its rows (cond + uncond)
  join the running batch at the next decode step, each in a KV-cache slot of its own;
- every decode step samples one frame for every running request with that request's own knobs,
  step count and seeded generator (inference/sampling.py), then runs one forward over all rows;
- a finished or cancelled request leaves at once: its slots are freed (the last rows move into
  the holes) before the next forward.

So requests of different lengths and tasks (speech, music, video-to-music) share steps, and a
request's codes depend on its seed and prompt only: alone, it reproduces `generate` bit for bit;
sharing steps, its rows see different GEMM batch shapes, which changes float rounding only
(greedy decoding gives the same codes; tests/unit/test_engine.py).

KV-cache layout (SlotKVCache): all rows share a column counter `length` (the next column every
row writes), so one decode step is one batched forward. A row's cached keys end at `length`
and start wherever its prefill began; columns before that are masked (`valid_BS`). A prefill
longer than `length` shifts the running rows right; when the columns run out the cache drops
the leading columns no row uses. RoPE positions live per row (`next_pos_B`), so moving
columns changes nothing a row sees.

Shape legend: R slot capacity (rows), B running rows, G KV heads, S cached columns, d head dim,
K codebooks, V codec vocab, C running requests.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.inference.generate import Prompt, _batch_prompts, _positions
from unimoe_ray.inference.sampling import (
    RowKnobs,
    SamplingConfig,
    apply_pattern_rules,
    row_generators,
    sample_frame,
)
from unimoe_ray.model.attention import KVCache
from unimoe_ray.model.unimoe_audio import UniMoEAudio


class EngineFullError(RuntimeError):
    """The engine's waiting queue is full: retry later (HTTP 429/503 at the serving layer)."""


class SlotKVCache:
    """Keys/values for up to R rows, R slots pre-allocated; the running rows are slots [0, B).

    Implements the cache interface `UniMoEAudio.forward` uses (check_room, update, advance,
    valid_BS, next_pos_B, length) over the running rows only.
    """

    def __init__(
        self, *, num_layers: int, rows: int, num_kv_heads: int, head_dim: int, max_len: int,
        dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> None:
        shape = (rows, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._valid_RS = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        self._next_pos_R = torch.zeros(rows, dtype=torch.long, device=device)
        self._start_R = torch.zeros(rows, dtype=torch.long)  # first cached column of each row
        self.rows = rows
        self.max_len = max_len
        self.n = 0  # running rows
        self.length = 0

    # ---- the interface the model calls ----

    @property
    def valid_BS(self) -> torch.Tensor:
        return self._valid_RS[: self.n]

    @property
    def next_pos_B(self) -> torch.Tensor:
        return self._next_pos_R[: self.n]

    @next_pos_B.setter
    def next_pos_B(self, value: torch.Tensor) -> None:
        self._next_pos_R[: self.n] = value

    def check_room(self, new: int) -> None:
        if self.length + new > self.max_len:
            self.compact()
        if self.length + new > self.max_len:
            raise ValueError(
                f"KV cache full: a row holds {self.length} columns + {new} new > max_len {self.max_len}; "
                "raise the engine's max_len (longest prompt + max frames + max delay + 1)"
            )

    def update(self, layer: int, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_BGLd.shape[2]
        self.k[layer][: self.n, :, self.length : end] = k_BGLd
        self.v[layer][: self.n, :, self.length : end] = v_BGLd
        return self.k[layer][: self.n, :, :end], self.v[layer][: self.n, :, :end]

    def advance(self, valid_BL: torch.Tensor, last_pos_B: torch.Tensor) -> None:
        L = valid_BL.shape[1]
        self._valid_RS[: self.n, self.length : self.length + L] = valid_BL
        self._next_pos_R[: self.n] = last_pos_B + 1
        self.length += L

    # ---- slots ----

    @property
    def free(self) -> int:
        return self.rows - self.n

    def join(self, prefill: KVCache) -> list[int]:
        """Copy a prefilled cache's rows into free slots, their keys ending at `length`."""
        r, Lp = prefill.k[0].shape[0], prefill.length
        if r > self.free:
            raise ValueError(f"{r} rows do not fit: {self.free} free slots of {self.rows}")
        if Lp > self.max_len:
            raise ValueError(f"prompt of {Lp} tokens does not fit a KV cache of {self.max_len} columns")
        if self.n == 0:
            self.length = 0
        if Lp > self.length:
            self._shift(Lp - self.length)
        elif self.length + 1 > self.max_len:
            self.compact()
        start, end = self.length - Lp, self.length
        slots = list(range(self.n, self.n + r))
        s0, s1 = slots[0], slots[-1] + 1
        for layer in range(len(self.k)):
            self.k[layer][s0:s1, :, start:end] = prefill.k[layer][:, :, :Lp]
            self.v[layer][s0:s1, :, start:end] = prefill.v[layer][:, :, :Lp]
        self._valid_RS[s0:s1] = False
        self._valid_RS[s0:s1, start:end] = prefill.valid_BS[:, :Lp]
        self._next_pos_R[s0:s1] = prefill.next_pos_B
        self._start_R[s0:s1] = start
        self.n += r
        return slots

    def remove(self, slots: list[int]) -> list[tuple[int, int]]:
        """Free `slots`; the last running rows move into the holes. Returns the (from, to)
        moves, in order, so callers can move their per-slot state the same way."""
        moves = []
        for slot in sorted(slots, reverse=True):
            last = self.n - 1
            if slot != last:
                for buf in (*self.k, *self.v):
                    buf[slot, :, : self.length] = buf[last, :, : self.length]
                self._valid_RS[slot] = self._valid_RS[last]
                self._next_pos_R[slot] = self._next_pos_R[last]
                self._start_R[slot] = self._start_R[last]
                moves.append((last, slot))
            self.n -= 1
        if self.n == 0:
            self.length = 0
        return moves

    def compact(self) -> None:
        """Drop the leading columns no running row uses."""
        if self.n == 0:
            self.length = 0
            return
        drop = int(self._start_R[: self.n].min())
        if drop == 0:
            return
        keep = self.length - drop
        for buf in (*self.k, *self.v):
            buf[: self.n, :, :keep] = buf[: self.n, :, drop : self.length].clone()
        self._valid_RS[: self.n, :keep] = self._valid_RS[: self.n, drop : self.length].clone()
        self._valid_RS[: self.n, keep:] = False
        self._start_R[: self.n] -= drop
        self.length = keep

    def _shift(self, delta: int) -> None:
        """Move the running rows `delta` columns right (room for a longer prefill)."""
        if self.length + delta > self.max_len:
            self.compact()
            if self.length + delta > self.max_len:
                raise ValueError(
                    f"a prompt needs {self.length + delta} columns beside the running rows: "
                    f"more than max_len {self.max_len}"
                )
        L = self.length
        if self.n:
            for buf in (*self.k, *self.v):
                buf[: self.n, :, delta : delta + L] = buf[: self.n, :, :L].clone()
            self._valid_RS[: self.n, delta : delta + L] = self._valid_RS[: self.n, :L].clone()
            self._valid_RS[: self.n, :delta] = False
            self._start_R[: self.n] += delta
        self.length = L + delta


@dataclass(frozen=True)
class EngineRequest:
    """One generation: a prompt, its negative (None: no guidance) and its sampling knobs."""

    prompt: Prompt
    negative: Prompt | None
    sampling: SamplingConfig


@dataclass(frozen=True)
class EngineOutput:
    """What one engine step produced for one request.

    frames_KT: frames completed at this step (delay pattern reverted; often 0 or 1 frame).
    done: the request left the batch; codes_KT then holds all its frames (None when it
    failed or was cancelled), finish_reason is "eos" | "length" | "cancelled" | "error"."""

    request_id: int
    frames_KT: torch.Tensor
    done: bool = False
    finish_reason: str | None = None
    codes_KT: torch.Tensor | None = None
    error: str | None = None


@dataclass
class _Running:
    rid: int
    req: EngineRequest
    generator: torch.Generator | None
    limit: int
    guided: bool
    step: int = 0
    eos_step: int = -1
    steps_KS: torch.Tensor | None = None  # the delayed frame of each step so far (columns [0, step))
    emitted: int = 0  # frames sent so far
    slots: list[int] = field(default_factory=list)  # cond slot first, then uncond
    joined_at: float = 0.0


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    finished: int = 0
    cancelled: int = 0
    last_step_rows: int = 0
    experts_per_token: float = 0.0  # mean routed+null experts per token over the last forward


class DecodeEngine:
    """Continuous batching over one model. Not thread-safe except `submit` and `cancel`,
    which may be called from any thread while another thread calls `step`.

    max_rows: KV slots (a guided request takes 2: cond + uncond). max_len: cache columns per
    row (longest prompt + max frames + max delay + 1). max_waiting: requests queued for a slot
    before `submit` raises EngineFullError (never an unbounded queue).
    """

    def __init__(self, model: UniMoEAudio, *, max_rows: int = 16, max_len: int = 2048, max_waiting: int = 64) -> None:
        if max_rows < 2:
            raise ValueError(f"max_rows={max_rows}: need at least 2 (one guided request = cond + uncond rows)")
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        self.pattern = DelayPattern(cfg.codec_delay_pattern, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad)
        p = model.codec_head.weight
        self.device = p.device
        self.cache = SlotKVCache(
            num_layers=cfg.num_layers, rows=max_rows, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_len=max_len, dtype=p.dtype, device=p.device,
        )
        self.max_waiting = max_waiting
        self._logits_RKV = torch.zeros(max_rows, cfg.codec_channels, cfg.codec_vocab_size, dtype=torch.float32, device=p.device)
        self._delays_K = torch.tensor(cfg.codec_delay_pattern, device=p.device)
        self._delays_cpu_K1 = torch.tensor(cfg.codec_delay_pattern)[:, None]
        self._waiting: deque[tuple[int, EngineRequest]] = deque()
        self._cancel: set[int] = set()
        self._running: list[_Running] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.stats = EngineStats()

    # ---- any thread ----

    def check(self, req: EngineRequest) -> None:
        """Raise ValueError if `req` can never run here (so callers can answer 4xx at once)."""
        rows = 2 if req.sampling.guidance_scale > 0 else 1
        if req.sampling.guidance_scale > 0 and req.negative is None:
            raise ValueError("guidance_scale > 0 needs a negative prompt (or set guidance_scale=0)")
        if rows > self.cache.rows:
            raise ValueError(f"a request needs {rows} rows; the engine has {self.cache.rows}")
        steps = req.sampling.frame_limit(self.pattern.max_delay) + self.pattern.max_delay + 1
        longest = max(p.input_ids_L.numel() + 1 for p in (req.prompt, req.negative) if p is not None)
        if longest + steps > self.cache.max_len:
            raise ValueError(
                f"prompt of {longest} tokens + up to {steps} decoding steps exceeds the engine's "
                f"max_len {self.cache.max_len}: shorten the input or max frames, or raise max_len"
            )

    def submit(self, req: EngineRequest) -> int:
        self.check(req)
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise EngineFullError(f"{len(self._waiting)} requests already wait for a slot")
            rid = next(self._ids)
            self._waiting.append((rid, req))
        return rid

    def cancel(self, rid: int) -> None:
        with self._lock:
            self._cancel.add(rid)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running_rows(self) -> int:
        return self.cache.n

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._cancel)

    # ---- the stepping thread ----

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        """Admit waiting requests (prefill, join), then one decode step for every running
        request: sample a frame each, emit completed frames, drop finished rows, one forward."""
        outputs: list[EngineOutput] = []
        outputs += self._apply_cancels()
        outputs += self._admit()
        if not self._running:
            return outputs
        cfg = self.cfg
        run = self._running
        cond_idx = [r.slots[0] for r in run]
        guided = any(r.guided for r in run)
        uncond_idx = [r.slots[1] if r.guided else r.slots[0] for r in run]
        knobs = RowKnobs.stack([r.req.sampling for r in run], self.device)
        step_C = torch.tensor([r.step for r in run], device=self.device)
        frame_CK = sample_frame(
            self._logits_RKV[cond_idx], self._logits_RKV[uncond_idx] if guided else None,
            knobs, step_C, [r.generator for r in run], eos=cfg.codec_eos,
        )
        eos_step_C = torch.tensor([r.eos_step for r in run], device=self.device)
        limit_C = torch.tensor([r.limit for r in run], device=self.device)
        frame_CK, eos_step_C = apply_pattern_rules(
            frame_CK, step_C, eos_step_C, limit_C, self._delays_K,
            bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad,
        )
        finished: list[_Running] = []
        frame_CK_cpu, eos_list = frame_CK.cpu(), eos_step_C.tolist()
        for c, r in enumerate(run):
            r.steps_KS[:, r.step] = frame_CK_cpu[c]
            r.eos_step = int(eos_list[c])
            done = r.eos_step >= 0 and r.step - r.eos_step >= self.pattern.max_delay
            outputs.append(self._emit(r, done))
            r.step += 1
            if done:
                finished.append(r)
        self.stats.steps += 1
        if finished:
            self._leave(finished)
            self.stats.finished += len(finished)
        if self._running:
            self._decode_forward({r.rid: frame_CK[c] for c, r in enumerate(run)})
        return outputs

    def run_to_completion(self, requests: list[EngineRequest]) -> list[torch.Tensor]:
        """Offline helper: submit all, step until done; codes per request, in order."""
        ids = [self.submit(r) for r in requests]
        codes: dict[int, torch.Tensor] = {}
        while self.has_work():
            for out in self.step():
                if out.done:
                    if out.codes_KT is None:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                    codes[out.request_id] = out.codes_KT
        return [codes[i] for i in ids]

    # ---- internals ----

    def _emit(self, r: _Running, done: bool) -> EngineOutput:
        """Frames completed by this step: frame t is whole once step t + max_delay ran."""
        upto = r.step - self.pattern.max_delay + 1  # frames [0, upto) are complete
        if r.eos_step >= 0:
            upto = min(upto, r.eos_step)
        K = self.cfg.codec_channels
        if upto > r.emitted:
            # Frame t of codebook k was sampled at step t + delay_k: one gather, not a stack
            # of the whole history (which grew with every step).
            idx_KT = self._delays_cpu_K1 + torch.arange(r.emitted, upto)
            frames_KT = r.steps_KS.gather(1, idx_KT)
            r.emitted = upto
        else:
            frames_KT = torch.zeros(K, 0, dtype=torch.long)
        if not done:
            return EngineOutput(r.rid, frames_KT)
        codes_KT = self.pattern.revert(r.steps_KS[:, : r.eos_step + self.pattern.max_delay + 1].clone())
        reason = "length" if r.eos_step >= r.limit else "eos"
        return EngineOutput(r.rid, frames_KT, done=True, finish_reason=reason, codes_KT=codes_KT)

    def _apply_cancels(self) -> list[EngineOutput]:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            if not cancel:
                return []
            kept = deque(w for w in self._waiting if w[0] not in cancel)
            dropped = [w[0] for w in self._waiting if w[0] in cancel]
            self._waiting = kept
        gone = [r for r in self._running if r.rid in cancel]
        if gone:
            self._leave(gone)
        empty = torch.zeros(self.cfg.codec_channels, 0, dtype=torch.long)
        self.stats.cancelled += len(gone) + len(dropped)
        return [EngineOutput(rid, empty, done=True, finish_reason="cancelled") for rid in dropped + [r.rid for r in gone]]

    def _admit(self) -> list[EngineOutput]:
        outputs = []
        while True:
            with self._lock:
                if not self._waiting:
                    break
                rid, req = self._waiting[0]
                rows = 2 if req.sampling.guidance_scale > 0 else 1
                if rows > self.cache.free:
                    break
                self._waiting.popleft()
            try:
                self._prefill(rid, req)
            except Exception as err:  # a bad prompt fails its own request, never the batch
                empty = torch.zeros(self.cfg.codec_channels, 0, dtype=torch.long)
                outputs.append(EngineOutput(rid, empty, done=True, finish_reason="error", error=f"{type(err).__name__}: {err}"))
        return outputs

    def _prefill(self, rid: int, req: EngineRequest) -> None:
        """The request's rows through the prompt, alone (as `generate` batches them), then into slots."""
        s = req.sampling
        guided = s.guidance_scale > 0
        rows = [req.prompt] + ([req.negative] if guided else [])
        batch = _batch_prompts(self.model, rows)
        L = batch["input_ids"].shape[1]
        prefill = self.model.new_cache(len(rows), L)
        out = self.model(
            batch["input_ids"], batch["audio"], attention_mask_BL=batch["mask"],
            position_ids_3BL=_positions(self.model, batch),
            pixel_values_videos=batch.get("pixel_values"), video_grid_thw=batch.get("grid"),
            cache=prefill, logits_last_only=True,
        )
        slots = self.cache.join(prefill)
        self._logits_RKV[slots] = out.codec_logits_BLKV[:, -1].float()
        gen = row_generators([s.seed], self.device)[0]
        limit = s.frame_limit(self.pattern.max_delay)
        # EOS comes at step `limit` at the latest (apply_pattern_rules forces it) and the row
        # leaves max_delay steps after it: steps 0 .. limit + max_delay.
        steps_KS = torch.empty(self.cfg.codec_channels, limit + self.pattern.max_delay + 1, dtype=torch.long)
        self._running.append(_Running(
            rid=rid, req=req, generator=gen, limit=limit, guided=guided,
            slots=slots, joined_at=time.monotonic(), steps_KS=steps_KS,
        ))
        self.stats.prefills += 1

    def _leave(self, gone: list[_Running]) -> None:
        ids = {r.rid for r in gone}
        slots = [s for r in gone for s in r.slots]
        self._running = [r for r in self._running if r.rid not in ids]
        owner = {s: (r, i) for r in self._running for i, s in enumerate(r.slots)}
        for src, dst in self.cache.remove(slots):
            self._logits_RKV[dst] = self._logits_RKV[src]
            r, i = owner.pop(src)
            r.slots[i] = dst
            owner[dst] = (r, i)

    def _decode_forward(self, frames: dict[int, torch.Tensor]) -> None:
        cfg = self.cfg
        B = self.cache.n
        audio_BK1 = torch.empty(B, cfg.codec_channels, 1, dtype=torch.long, device=self.device)
        for r in self._running:
            for s in r.slots:
                audio_BK1[s, :, 0] = frames[r.rid]
        ids_B1 = torch.full((B, 1), cfg.codec_placeholder_id, dtype=torch.long, device=self.device)
        out = self.model(ids_B1, audio_BK1, cache=self.cache, logits_last_only=True)
        self._logits_RKV[:B] = out.codec_logits_BLKV[:, -1].float()
        if out.moe_stats:
            self.stats.experts_per_token = float(torch.stack([st.k_T.float().mean() for st in out.moe_stats]).mean())
        self.stats.last_step_rows = B


class EngineLoop:
    """Runs a DecodeEngine's steps on a background thread and hands each request's outputs to
    the callback given at submit (called on that thread). The serving layer bridges the
    callbacks to its event loop."""

    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self._callbacks: dict[int, Callable[[EngineOutput], None]] = {}
        self._registry = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self._thread.start()

    def submit(self, req: EngineRequest, callback: Callable[[EngineOutput], None]) -> int:
        with self._registry:  # the loop dispatches under this lock: it finds the callback
            rid = self.engine.submit(req)
            self._callbacks[rid] = callback
        self._wake.set()
        return rid

    def cancel(self, rid: int) -> None:
        self.engine.cancel(rid)
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a broken step fails the running requests, not the loop
                outputs = self._fail_all(err)
            for out in outputs:
                with self._registry:
                    cb = self._callbacks.pop(out.request_id, None) if out.done else self._callbacks.get(out.request_id)
                if cb is not None:
                    try:
                        cb(out)
                    except Exception:
                        pass  # a consumer that went away must not stop the engine

    def _fail_all(self, err: Exception) -> list[EngineOutput]:
        eng = self.engine
        gone = list(eng._running)
        if gone:
            eng._leave(gone)
        empty = torch.zeros(eng.cfg.codec_channels, 0, dtype=torch.long)
        msg = f"{type(err).__name__}: {err}"
        return [EngineOutput(r.rid, empty, done=True, finish_reason="error", error=msg) for r in gone]
