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

Isolation (one request can never harm another; tests/unit/test_engine_isolation.py):
- admission is all-or-nothing: seeding, prompt checks and the prefill run before the request's
  rows are visible; a failure after its rows joined removes them again;
- a request that ends for any reason (EOS, length, cancel, deadline, error) frees its slots in
  the same step: `check_invariants` holds after every step (free slots + the running requests'
  slots == max_rows, no slot owned twice);
- a row whose logits cannot be sampled (NaN/inf) fails its own request only: sampling is
  row-wise with a generator per row, and the row leaves before the next forward, so the others
  decode on exactly as in a batch without it;
- every request has a deadline; a row or a queued request past it ends with "timeout".

The KV-cache slots: SlotKVCache (model/kv_cache.py). The background thread that runs the steps
for a server: EngineLoop (inference/engine_loop.py).

Shape legend: R slot capacity (rows), B running rows, G KV heads, S cached columns, d head dim,
K codebooks, V codec vocab, C running requests.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.inference.generate import batch_prompts, prompt_positions
from unimoe_ray.inference.sampling import RowKnobs, SamplingConfig, apply_pattern_rules, row_generators, sample_rows
from unimoe_ray.model.kv_cache import SlotKVCache
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.text.prompt import Prompt


class EngineFullError(RuntimeError):
    """The engine's waiting queue is full: retry later (HTTP 429/503 at the serving layer)."""


class EngineInvariantError(RuntimeError):
    """The engine's slot accounting is inconsistent (a bug): the replica must be replaced."""


@dataclass(frozen=True)
class EngineRequest:
    """One generation: a prompt, its negative (None: no guidance) and its sampling knobs.
    timeout_s: seconds from submit after which the request ends with finish_reason "timeout"
    wherever it is (queued or decoding); None: the engine's default."""

    prompt: Prompt
    negative: Prompt | None
    sampling: SamplingConfig
    timeout_s: float | None = None


@dataclass(frozen=True)
class EngineOutput:
    """What one engine step produced for one request.

    frames_KT: frames completed at this step (delay pattern reverted; often 0 or 1 frame).
    done: the request left the batch; codes_KT then holds all its frames (None when it
    failed or was cancelled), finish_reason is "eos" | "length" | "cancelled" | "timeout" |
    "error". error_kind (with "error"): "invalid" (the request's own input or knobs: a client
    error) or "internal" (the model or the engine failed: a server error)."""

    request_id: int
    frames_KT: torch.Tensor
    done: bool = False
    finish_reason: str | None = None
    codes_KT: torch.Tensor | None = None
    error: str | None = None
    error_kind: str | None = None


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
    deadline: float = float("inf")  # time.monotonic() past which the request ends ("timeout")


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    finished: int = 0
    cancelled: int = 0
    last_step_rows: int = 0
    experts_per_token: float = 0.0  # mean routed+null experts per token over the last forward
    failed: int = 0  # requests ended by an error (their own or the model's)
    timed_out: int = 0


class DecodeEngine:
    """Continuous batching over one model. Not thread-safe except `submit` and `cancel`,
    which may be called from any thread while another thread calls `step`.

    max_rows: KV slots (a guided request takes 2: cond + uncond). max_len: cache columns per
    row (longest prompt + max frames + max delay + 1). max_waiting: requests queued for a slot
    before `submit` raises EngineFullError (never an unbounded queue). timeout_s: a request's
    deadline from submit unless it sets its own.
    """

    def __init__(
        self,
        model: UniMoEAudio,
        *,
        max_rows: int = 16,
        max_len: int = 2048,
        max_waiting: int = 64,
        timeout_s: float = 600.0,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 (seconds a request may take from submit)")
        self.timeout_s = timeout_s
        if max_rows < 2:
            raise ValueError(f"max_rows={max_rows}: need at least 2 (one guided request = cond + uncond rows)")
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        self.pattern = DelayPattern(cfg.codec_delay_pattern, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad)
        p = model.codec_head.weight
        self.device = p.device
        self.cache = SlotKVCache(
            num_layers=cfg.num_layers,
            rows=max_rows,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            max_len=max_len,
            dtype=p.dtype,
            device=p.device,
        )
        self.max_waiting = max_waiting
        self._logits_RKV = torch.zeros(
            max_rows, cfg.codec_channels, cfg.codec_vocab_size, dtype=torch.float32, device=p.device
        )
        self._delays_K = torch.tensor(cfg.codec_delay_pattern, device=p.device)
        self._delays_cpu_K1 = torch.tensor(cfg.codec_delay_pattern)[:, None]
        self._waiting: deque[tuple[int, EngineRequest, float]] = deque()  # (id, request, deadline)
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
        if req.timeout_s is not None and not req.timeout_s > 0:
            raise ValueError(f"timeout_s={req.timeout_s}: must be > 0")
        vocab = self.cfg.vocab_size
        for p in (req.prompt, req.negative):
            if p is None:
                continue
            ids = p.input_ids_L
            if ids.dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64) or ids.dim() != 1:
                raise ValueError(f"prompt token ids must be a 1-D integer tensor (got {ids.dtype}, {ids.dim()}-D)")
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
                raise ValueError(f"prompt token ids outside [0, {vocab}): the tokenizer does not match the model")
            codes = p.audio_codes_KL
            if (
                codes is not None
                and codes.numel()
                and not (0 <= int(codes.min()) and int(codes.max()) < self.cfg.codec_vocab_size)
            ):
                raise ValueError(
                    f"prompt audio codes outside [0, {self.cfg.codec_vocab_size}): "
                    "the voice was encoded by another codec"
                )
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
            timeout = req.timeout_s if req.timeout_s is not None else self.timeout_s
            self._waiting.append((rid, req, time.monotonic() + timeout))
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

    def check_invariants(self) -> None:
        """Raise EngineInvariantError unless the slot accounting is consistent: the running
        requests own exactly slots [0, n) of the cache, each once, with 2 slots when guided."""
        owned = [s for r in self._running for s in r.slots]
        problems = []
        if sorted(owned) != list(range(self.cache.n)):
            problems.append(f"running requests own slots {sorted(owned)} but the cache runs {self.cache.n} rows")
        if any(len(r.slots) != (2 if r.guided else 1) for r in self._running):
            problems.append("a running request holds the wrong number of slots")
        if not 0 <= self.cache.n <= self.cache.rows or self.cache.free != self.cache.rows - self.cache.n:
            problems.append(f"{self.cache.n} running rows of {self.cache.rows}")
        if self.cache.n == 0 and self.cache.length != 0:
            problems.append(f"no running rows but {self.cache.length} cached columns")
        if problems:
            raise EngineInvariantError("decode engine slot accounting broken: " + "; ".join(problems))

    def fail_all(self, message: str) -> list[EngineOutput]:
        """End every running and waiting request with an internal error and free all slots
        (after a step failed outside any one row). The engine is empty and usable after it."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            self._cancel = set()
        gone = list(self._running)
        self._running = []
        self.cache.remove(list(range(self.cache.n)))
        self.cache.length = 0
        self.stats.failed += len(gone) + len(waiting)
        ids = [r.rid for r in gone] + [w[0] for w in waiting]
        return [self._ended(rid, "error", message, "internal") for rid in ids]

    # ---- the stepping thread ----

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        """Admit waiting requests (prefill, join), then one decode step for every running
        request: sample a frame each, emit completed frames, drop finished rows, one forward."""
        outputs: list[EngineOutput] = []
        outputs += self._apply_cancels()
        outputs += self._expire()
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
        frame_CK, failures = sample_rows(
            self._logits_RKV[cond_idx],
            self._logits_RKV[uncond_idx] if guided else None,
            knobs,
            step_C,
            [r.generator for r in run],
            eos=cfg.codec_eos,
        )
        if failures:
            # The failed rows leave before anything else happens to them; the others' frames
            # are untouched (sampling is row-wise).
            failed = [run[f.row] for f in failures]
            for f in failures:
                outputs.append(self._ended(run[f.row].rid, "error", f.message, "internal" if f.internal else "invalid"))
            keep = [c for c in range(len(run)) if c not in {f.row for f in failures}]
            self._leave(failed)
            self.stats.failed += len(failed)
            run, frame_CK, step_C = [run[c] for c in keep], frame_CK[keep], step_C[keep]
            if not run:
                return outputs
        eos_step_C = torch.tensor([r.eos_step for r in run], device=self.device)
        limit_C = torch.tensor([r.limit for r in run], device=self.device)
        frame_CK, eos_step_C = apply_pattern_rules(
            frame_CK,
            step_C,
            eos_step_C,
            limit_C,
            self._delays_K,
            bos=cfg.codec_bos,
            eos=cfg.codec_eos,
            pad=cfg.codec_pad,
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

    def _ended(self, rid: int, reason: str, error: str | None = None, kind: str | None = None) -> EngineOutput:
        empty = torch.zeros(self.cfg.codec_channels, 0, dtype=torch.long)
        return EngineOutput(rid, empty, done=True, finish_reason=reason, error=error, error_kind=kind)

    def _expire(self) -> list[EngineOutput]:
        """End queued and running requests past their deadline."""
        now = time.monotonic()
        with self._lock:
            late = [w for w in self._waiting if w[2] <= now]
            if late:
                self._waiting = deque(w for w in self._waiting if w[2] > now)
        gone = [r for r in self._running if r.deadline <= now]
        if gone:
            self._leave(gone)
        out = []
        for rid, timeout in [(w[0], w[1].timeout_s) for w in late] + [(r.rid, r.req.timeout_s) for r in gone]:
            t = timeout if timeout is not None else self.timeout_s
            out.append(
                self._ended(rid, "timeout", f"the request did not finish within its {t:g} s deadline", "timeout")
            )
        self.stats.timed_out += len(out)
        return out

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
        self.stats.cancelled += len(gone) + len(dropped)
        return [self._ended(rid, "cancelled") for rid in dropped + [r.rid for r in gone]]

    def _admit(self) -> list[EngineOutput]:
        outputs = []
        while True:
            with self._lock:
                if not self._waiting:
                    break
                rid, req, deadline = self._waiting[0]
                rows = 2 if req.sampling.guidance_scale > 0 else 1
                if rows > self.cache.free:
                    break
                self._waiting.popleft()
            try:
                self._prefill(rid, req, deadline)
            except Exception as err:  # a bad prompt fails its own request, never the batch
                # ValueError: the request's own input (a client error); anything else is the
                # model's or the engine's failure.
                kind = "invalid" if isinstance(err, ValueError) else "internal"
                self.stats.failed += 1
                outputs.append(self._ended(rid, "error", f"{type(err).__name__}: {err}", kind))
        return outputs

    def _prefill(self, rid: int, req: EngineRequest, deadline: float) -> None:
        """The request's rows through the prompt, alone (as `generate` batches them), then into
        slots. All-or-nothing: everything that can fail runs before the rows join the cache,
        and a failure after the join removes them again."""
        s = req.sampling
        guided = s.guidance_scale > 0
        gen = row_generators([s.seed], self.device)[0]
        limit = s.frame_limit(self.pattern.max_delay)
        # EOS comes at step `limit` at the latest (apply_pattern_rules forces it) and the row
        # leaves max_delay steps after it: steps 0 .. limit + max_delay.
        steps_KS = torch.empty(self.cfg.codec_channels, limit + self.pattern.max_delay + 1, dtype=torch.long)
        rows = [req.prompt] + ([req.negative] if guided else [])
        batch = batch_prompts(self.model, rows)
        L = batch["input_ids"].shape[1]
        prefill = self.model.new_cache(len(rows), L)
        out = self.model(
            batch["input_ids"],
            batch["audio"],
            attention_mask_BL=batch["mask"],
            position_ids_3BL=prompt_positions(self.model, batch),
            pixel_values_videos=batch.get("pixel_values"),
            video_grid_thw=batch.get("grid"),
            cache=prefill,
            logits_last_only=True,
        )
        logits_RKV = out.codec_logits_BLKV[:, -1].float()
        slots = self.cache.join(prefill)
        try:
            self._logits_RKV[slots] = logits_RKV
            self._running.append(
                _Running(
                    rid=rid,
                    req=req,
                    generator=gen,
                    limit=limit,
                    guided=guided,
                    slots=slots,
                    joined_at=time.monotonic(),
                    steps_KS=steps_KS,
                    deadline=deadline,
                )
            )
        except BaseException:
            if self._running and self._running[-1].rid == rid:
                self._running.pop()
            self.cache.remove(slots)  # the last rows: nothing moves
            raise
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
