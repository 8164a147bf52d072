"""Key/value caches for decoding, both implementing the interface `UniMoEAudio.forward` uses
(check_room, update, advance, valid_BS, next_pos_B, length):

- `KVCache`: one fixed batch from start to end (`inference/generate.py`);
- `SlotKVCache`: R pre-allocated slots whose running rows change between steps (the
  continuous-batching engine, `inference/engine.py`).

KV-cache layout (SlotKVCache): all rows share a column counter `length` (the next column every
row writes), so one decode step is one batched forward. A row's cached keys end at `length`
and start wherever its prefill began; columns before that are masked (`valid_BS`). A prefill
longer than `length` shifts the running rows right; when the columns run out the cache drops
the leading columns no row uses. RoPE positions live per row (`next_pos_B`), so moving
columns changes nothing a row sees.

Shape legend: B batch (running rows), R slot capacity, G KV heads, L new tokens, S cached
columns, d head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Pre-allocated key/value buffers for all layers, plus which cached positions are real
    (left padding) and the next RoPE position of each row."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid_BS = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    def check_room(self, new: int) -> None:
        if self.length + new > self.max_len:
            raise ValueError(
                f"KV cache full: {self.length} cached + {new} new > max_len {self.max_len}; "
                "allocate a larger cache (prompt length + max_frames + max delay + 1)"
            )

    def update(self, layer: int, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys/values; returns all of them so far (k_BGSd, v_BGSd)."""
        end = self.length + k_BGLd.shape[2]
        self.k[layer][:, :, self.length : end] = k_BGLd
        self.v[layer][:, :, self.length : end] = v_BGLd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, valid_BL: torch.Tensor, last_pos_B: torch.Tensor) -> None:
        """After all layers ran on L new tokens."""
        L = valid_BL.shape[1]
        self.valid_BS[:, self.length : self.length + L] = valid_BL
        self.next_pos_B = last_pos_B + 1
        self.length += L


class SlotKVCache:
    """Keys/values for up to R rows, R slots pre-allocated; the running rows are slots [0, B).

    Implements the cache interface `UniMoEAudio.forward` uses (check_room, update, advance,
    valid_BS, next_pos_B, length) over the running rows only.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
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
