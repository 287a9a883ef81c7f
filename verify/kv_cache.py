"""The target's KV cache, owned by the project: preallocated, position-indexed, one length per row
(in the spirit of gpt-fast's static cache).

Glossary:
    slot / row: one sequence of the batch; rows ``0 .. batch-1`` are the active ones (a dense prefix).
    length[r]: how many positions of row r hold valid keys/values (positions ``0 .. length[r]-1``).
    capacity: positions allocated per row; grown (doubled) when a forward needs more.

A forward over ``n`` new tokens per row writes them at positions ``length[r] .. length[r]+n-1`` of
each row and attends over ``0 .. max(length)+n-1`` under an explicit 4-D mask built from the lengths
(:meth:`StaticKVCache.attention_mask`), so rows of different lengths need no padding of the context.
Nothing is committed by the forward itself: :meth:`advance` then moves each row's length by what it
keeps. A rejected draft therefore costs nothing to undo (its slots are simply overwritten later); a
draft tree keeps its accepted path by a gather within the row (:meth:`keep_paths`); a finished row is
dropped by :meth:`reorder`, which keeps the active rows a dense prefix.

The class speaks the part of transformers' ``Cache`` interface that decoder layers use
(``update(key, value, layer_idx)``), so any HF causal LM runs on it unchanged, given the mask and the
position ids (:meth:`positions`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


class StaticKVCache:
    """Per-layer keys/values ``(max_batch, kv_heads, capacity, head_dim)`` with a length per row.

    Args:
        num_layers, num_kv_heads, head_dim: the attention shape of the model it serves.
        max_batch: rows allocated.
        dtype, device: of the keys/values.
        capacity: initial positions per row (grown on demand).
    """

    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_batch: int,
        dtype: torch.dtype,
        device: torch.device | str,
        capacity: int = 256,
    ) -> None:
        if min(num_layers, num_kv_heads, head_dim, max_batch, capacity) < 1:
            raise ValueError("StaticKVCache needs positive layers, heads, head_dim, max_batch and capacity")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_batch = max_batch
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = _round_up(capacity)
        shape = (max_batch, num_kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.lengths: list[int] = [0] * max_batch  # host copy: no device sync to read it
        self._arange = torch.arange(max_batch, device=self.device)
        self.batch = 0  # active rows: 0 .. batch-1
        self._rows: torch.Tensor | None = None  # the rows of the forward being run (None: 0 .. batch-1)
        self._write: torch.Tensor | None = None  # (b, n) positions the forward writes
        self._kv_len = 0

    @classmethod
    def for_model(cls, model: PreTrainedModel, max_batch: int, capacity: int = 256) -> "StaticKVCache":
        """A cache shaped for a transformers decoder-only model (``config.num_key_value_heads`` ...)."""
        cfg = model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, heads, head_dim, max_batch, model.dtype, model.device, capacity)

    # ---- bookkeeping ------------------------------------------------------------------------------
    def length_tensor(self, rows: list[int] | None = None) -> torch.Tensor:
        """(b,) long lengths of ``rows`` (default: the active rows), on the cache's device."""
        values = self.lengths[: self.batch] if rows is None else [self.lengths[r] for r in rows]
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.no_grad()  # not inference_mode: grown tensors stay the kind __init__ made (plain tensors)
    def _ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = _round_up(max(needed, 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = torch.zeros(
                    (self.max_batch, self.num_kv_heads, new_cap, self.head_dim), dtype=self.dtype, device=self.device
                )
                grown[:, :, : self.capacity] = old
                store[i] = grown
        self.capacity = new_cap

    def add_rows(self, count: int) -> list[int]:
        """Activate ``count`` more rows (length 0) at the end of the active prefix; returns their indices."""
        if self.batch + count > self.max_batch:
            raise ValueError(
                f"cannot hold {self.batch + count} rows: the cache was built for max_batch={self.max_batch}"
            )
        rows = list(range(self.batch, self.batch + count))
        for r in rows:
            self.lengths[r] = 0
        self.batch += count
        return rows

    def reset_rows(self, rows: list[int]) -> None:
        """Empty ``rows`` (a new sequence takes their slots)."""
        for r in rows:
            self.lengths[r] = 0

    def start_rows(self, rows: list[int]) -> None:
        """Empty ``rows``, activating (and allocating) them when they lie past the active prefix."""
        top = max(rows, default=-1) + 1
        if top > self.max_batch:
            self._grow_rows(top)
        self.reset_rows(rows)
        self.batch = max(self.batch, top)

    @torch.no_grad()  # as _ensure
    def _grow_rows(self, rows: int) -> None:
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = torch.zeros((rows, *old.shape[1:]), dtype=self.dtype, device=self.device)
                grown[: old.shape[0]] = old
                store[i] = grown
        self.lengths += [0] * (rows - self.max_batch)
        self.max_batch = rows
        self._arange = torch.arange(rows, device=self.device)

    def view(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (batch, H, max length, D) of the active rows (positions past a row's length are garbage)."""
        n = max(self.lengths[: self.batch], default=0)
        return self.keys[layer_idx][: self.batch, :, :n], self.values[layer_idx][: self.batch, :, :n]

    @torch.inference_mode()
    def reorder(self, index: list[int]) -> None:
        """Keep the rows ``index`` (new row i = old row index[i]); the active batch becomes len(index).
        Only the rows that move are copied."""
        moves = [(dst, src) for dst, src in enumerate(index) if dst != src]
        if moves:
            dst = torch.tensor([d for d, _ in moves], dtype=torch.long, device=self.device)
            src = torch.tensor([s for _, s in moves], dtype=torch.long, device=self.device)
            for store in (self.keys, self.values):
                for t in store:
                    t[dst] = t[src]  # gather first (advanced indexing copies), then write
        old = list(self.lengths)
        for dst, src in enumerate(index):
            self.lengths[dst] = old[src]
        self.batch = len(index)

    @torch.inference_mode()
    def copy_rows(self, src: list[int], dst: list[int]) -> None:
        """Row dst[i] becomes a copy of row src[i] (keys, values, length): samples of one prompt share
        its prefill."""
        if not src:
            return
        s = torch.tensor(src, dtype=torch.long, device=self.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.device)
        for store in (self.keys, self.values):
            for t in store:
                t[d] = t[s]
        for i, j in zip(src, dst):
            self.lengths[j] = self.lengths[i]

    # ---- one forward ------------------------------------------------------------------------------
    def plan(self, n: int, rows: list[int] | None = None) -> None:
        """Prepare a forward of ``n`` tokens per row over ``rows`` (default: every active row)."""
        lengths = self.lengths[: self.batch] if rows is None else [self.lengths[r] for r in rows]
        if not lengths:
            raise ValueError("a forward needs at least one row")
        self._ensure(max(lengths) + n)
        self._rows = None if rows is None else torch.tensor(rows, dtype=torch.long, device=self.device)
        start = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self._write = start[:, None] + torch.arange(n, device=self.device)  # (b, n)
        self._kv_len = max(lengths) + n

    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """Position ids (b, n) of the planned forward: each row's length plus ``offsets`` (b, n) or (n,)
        (0, 1, ... for a chain; 0 and 1 + depth for a tree's [root, nodes])."""
        assert self._write is not None, "plan() first"
        return self._write[:, :1] + offsets

    def attention_mask(self, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (b, 1, n, kv_len) for the planned forward: each query sees its row's cached
        positions and, among the n new ones, those ``block`` (n, n) or (b, n, n) bool allows."""
        assert self._write is not None, "plan() first"
        b, n = self._write.shape
        start = self._write[:, 0]  # (b,)
        col = torch.arange(self._kv_len, device=self.device)
        rel = col[None, :] - start[:, None]  # (b, kv_len): offset into the new block
        inside = (rel >= 0) & (rel < n)
        block = block.to(self.device).expand(b, n, n)
        picked = block.gather(2, rel.clamp(0, n - 1)[:, None, :].expand(b, n, self._kv_len))  # (b, n, kv_len)
        allowed = (rel < 0)[:, None, :] | (inside[:, None, :] & picked)
        mask = torch.zeros((b, 1, n, self._kv_len), dtype=dtype, device=self.device)
        return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' Cache hook: write (b, H, n, D) at the planned positions, return the row's keys/values
        over ``0 .. kv_len-1``."""
        assert self._write is not None, "plan() before running the model"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._rows is None:
            b = key_states.shape[0]
            rows = self._arange[:b, None]  # (b, 1)
            # advanced-index assignment (an index_put): several times faster than scatter_ for bf16 on CPU
            keys[rows, :, self._write] = key_states.transpose(1, 2).to(self.dtype)  # (b, n, H, D) at (row, position)
            values[rows, :, self._write] = value_states.transpose(1, 2).to(self.dtype)
            return keys[:b, :, : self._kv_len], values[:b, :, : self._kv_len]
        rows = self._rows[:, None]
        keys[rows, :, self._write] = key_states.transpose(1, 2).to(self.dtype)
        values[rows, :, self._write] = value_states.transpose(1, 2).to(self.dtype)
        return keys[self._rows, :, : self._kv_len], values[self._rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths[: self.batch], default=0)

    def advance(self, counts: list[int], rows: list[int] | None = None) -> None:
        """Commit the first ``counts[i]`` planned positions of each row (the rest are left as garbage)."""
        for r, c in zip(range(self.batch) if rows is None else rows, counts):
            self.lengths[r] += c
        self._write = self._rows = None

    @torch.inference_mode()
    def keep_paths(self, paths: torch.Tensor) -> None:
        """After a tree forward over [root, nodes] of the active rows: move node ``paths[r, i]`` (b, m)
        long of each row to slot ``1 + i`` after the root (pad a shorter path with ``i`` itself).
        Call before :meth:`advance`."""
        assert self._write is not None, "keep_paths() belongs to a planned forward"
        b, m = paths.shape
        if m == 0:
            return
        root = self._write[:, :1]  # (b, 1)
        src = root + 1 + paths.to(self.device)  # (b, m)
        dst = root + 1 + torch.arange(m, device=self.device)
        rows = self._arange[:b, None]
        for store in (self.keys, self.values):
            for t in store:
                t[rows, :, dst] = t[rows, :, src]  # the right side is a gathered copy: safe when slots overlap
