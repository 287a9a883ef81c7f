"""On-disk caches of per-position target outputs for the distillation sequences: hidden-state
features (:class:`FeatureStore`) and the teacher's top-k next-token log-probabilities
(:class:`TeacherStore`).

Training step (b) of the recipe: the frozen target runs once over every (prompt + response)
sequence and the hidden states of the drafter's ``target_layer_ids`` are stored (float16, one raw
memory-mapped file per data shard plus a JSON index), so every later epoch, evaluation and resumed
run reads them instead of re-running the target. On the 2-core CPU this turns a ~8 s training step
(dominated by the target's forward) into ~1-2 s.

:class:`TeacherStore` does the same for step (c)'s optional distillation: the target's top-k
next-token log-probabilities at every position (ids and log-probs, float32), so the drafter can
learn the target's own distribution, not only the sampled token.

When both caches are missing, :func:`build_stores` fills them from one target forward.

Each shard's index records the sequence lengths, a SHA-1 of the token ids and the precision of the
target pass (``fp32``, or ``bf16`` autocast), so a changed shard, a different target/layer set or
the other precision is recomputed instead of silently reused. Files are written
atomically (temporary name + rename): a kill loses at most the shard in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dllm_spec.jsonl import write_atomic

FLOAT16_MAX = 65504.0


def _ids_digest(rows: list[list[int]]) -> str:
    h = hashlib.sha1()
    for ids in rows:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def feature_dir(root: str | os.PathLike, target: PreTrainedModel, layer_ids: list[int]) -> Path:
    """Cache directory of one (target, layer set): ``root/<target digest>/L<ids>``."""
    name = str(getattr(target.config, "_name_or_path", "")) + json.dumps(
        target.config.to_diff_dict(), sort_keys=True, default=str
    )
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return Path(root) / digest / ("L" + "-".join(str(i) for i in layer_ids))


@torch.no_grad()
def compute_features(
    target: PreTrainedModel, ids: torch.Tensor, attention: torch.Tensor, layer_ids: list[int]
) -> torch.Tensor:
    """Hidden states of ``layer_ids`` for a right-padded batch (N, T) -> (N, T, n * H)."""
    out = target.model(input_ids=ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[i] for i in layer_ids], dim=-1)


class PositionStore:
    """Per-position arrays of every data shard's sequences, computed once and memory-mapped.

    Subclasses set ``width``, ``dtype``, ``suffix`` and implement :meth:`from_hidden` (the target's
    hidden states of a right-padded batch -> (N, T, width)), so several stores are filled from one
    target forward (:func:`build_stores`)."""

    width: int
    dtype: type = np.float16
    suffix: str = ".f16"

    def __init__(self, directory: str | os.PathLike, target: PreTrainedModel) -> None:
        self.dir = Path(directory)
        self.target = target
        self._maps: dict[str, tuple[np.memmap, list[int]]] = {}

    def from_hidden(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``hidden_states`` as returned by ``target.model(..., output_hidden_states=True)``
        (embeddings, then every layer's output, the last one normed), each (N, T, H) -> (N, T, width)."""
        raise NotImplementedError

    def _paths(self, shard: str) -> tuple[Path, Path]:
        return self.dir / f"{shard}{self.suffix}", self.dir / f"{shard}.json"

    def _valid(self, shard: str, rows: list[list[int]], precision: str = "fp32") -> bool:
        """Whether the shard's arrays are stored for these ids, this width and the target pass's
        ``precision`` (an index without one, from before it was recorded, is recomputed)."""
        data, index = self._paths(shard)
        if not (data.is_file() and index.is_file()):
            return False
        meta = json.loads(index.read_text())
        return (
            meta.get("ids_sha1") == _ids_digest(rows)
            and meta.get("width") == self.width
            and meta.get("precision") == precision
        )

    def build(self, shards: dict[str, list[list[int]]], batch_size: int = 8, show_progress: bool = True) -> None:
        """Compute and store the arrays of every shard not cached yet. ``shards`` maps a shard
        name to its sequences' token ids (in row order)."""
        build_stores([self], shards, batch_size, show_progress)

    def get(self, shard: str, row: int, length: int) -> torch.Tensor:
        """The first ``length`` positions of one sequence: (length, width) float32."""
        if shard not in self._maps:
            data_path, index_path = self._paths(shard)
            if not index_path.is_file():
                raise FileNotFoundError(f"no cached features for shard {shard} in {self.dir}; call build() first")
            offsets = json.loads(index_path.read_text())["offsets"]
            arr = np.memmap(data_path, dtype=self.dtype, mode="r", shape=(offsets[-1], self.width))
            self._maps[shard] = (arr, offsets)
        arr, offsets = self._maps[shard]
        start, end = offsets[row], offsets[row + 1]
        if length > end - start:
            raise ValueError(f"sequence {shard}:{row} has {end - start} cached positions, {length} requested")
        return torch.from_numpy(np.array(arr[start : start + length], dtype=np.float32))  # a writable float32 copy

    def batch(
        self, keys: list[tuple[str, int]], lengths: list[int], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Right-padded arrays of several sequences: (N, max length, width) float32."""
        width = max(lengths)
        out = torch.zeros((len(keys), width, self.width))
        for j, ((shard, row), n) in enumerate(zip(keys, lengths)):
            out[j, :n] = self.get(shard, row, n)
        return out.to(device)


class FeatureStore(PositionStore):
    """Hidden states of the drafter's ``layer_ids`` (float16, width n * H).

    Args:
        directory: from :func:`feature_dir` (one target and layer set).
        target: the frozen target.
        layer_ids: hidden-state indices to store, concatenated in this order.
    """

    def __init__(self, directory: str | os.PathLike, target: PreTrainedModel, layer_ids: list[int]) -> None:
        super().__init__(directory, target)
        self.layer_ids = list(layer_ids)
        self.width = len(self.layer_ids) * target.config.hidden_size

    def from_hidden(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([hidden_states[i] for i in self.layer_ids], dim=-1)


def teacher_topk(target: PreTrainedModel, hidden: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k next-token log-probabilities from the target's final (normed) hidden states:
    (N, T, H) -> (N, T, 2k), token ids (exact as float32) then their log-probabilities."""
    head = target.get_output_embeddings()
    out = []
    for row in hidden:  # one sequence at a time: (T, V) logits, not (N, T, V)
        logp = torch.log_softmax(head(row).float(), dim=-1)
        top = logp.topk(k, dim=-1)
        out.append(torch.cat([top.indices.float(), top.values], dim=-1))
    return torch.stack(out)


class TeacherStore(PositionStore):
    """The target's top-``k`` next-token log-probabilities at every position (float32, width 2k):
    position t holds the target's distribution of token t + 1 given tokens <= t."""

    dtype = np.float32
    suffix = ".f32"

    def __init__(self, directory: str | os.PathLike, target: PreTrainedModel, k: int = 8) -> None:
        if k < 1:
            raise ValueError(f"teacher top-k must be >= 1, got {k}")
        super().__init__(directory, target)
        self.k = k
        self.width = 2 * k

    def from_hidden(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return teacher_topk(self.target, hidden_states[-1], self.k)


def teacher_dir(root: str | os.PathLike, target: PreTrainedModel, k: int) -> Path:
    """Cache directory of one target's top-k teacher outputs: ``root/<target digest>/teacher-top<k>``."""
    return feature_dir(root, target, []).with_name(f"teacher-top{k}")


def _write_index(store: PositionStore, shard: str, rows: list[list[int]], offsets: np.ndarray, precision: str) -> None:
    meta = {
        "ids_sha1": _ids_digest(rows),
        "width": store.width,
        "offsets": offsets.tolist(),
        "kind": type(store).__name__,
        "precision": precision,
    }
    write_atomic(store._paths(shard)[1], json.dumps(meta))


def _target_outputs(
    stores: list[PositionStore],
    shards: dict[str, list[list[int]]],
    batch_size: int,
    show_progress: bool,
    bf16: bool = False,
) -> Iterator[tuple[str, np.ndarray, Iterator[tuple[list[int], list[torch.Tensor]]]]]:
    """Run the stores' shared target once per batch over every shard of ``shards`` (under bf16
    autocast with ``bf16``: on a 2-core CPU with AMX, 8 x 512 tokens of the embedded target, the
    body ran 2.0-2.3K against 0.74-0.80K tokens/s in fp32, body and top-k head together 1.0-1.2K
    against 0.53-0.62K; training tolerates the features' bf16 noise, which is what the drafter sees
    at inference in that dtype anyway).

    Yields ``(shard, offsets, batches)`` per shard: ``offsets`` (rows + 1,) the cumulative sequence
    lengths, ``batches`` an iterator (consume it before the next shard) of ``(rows, arrays)``:
    the batch's row numbers and one (n, T, width) float32 tensor per store, on the target's device."""
    target = stores[0].target
    if any(s.target is not target for s in stores):
        raise ValueError("build_stores needs stores of one target")
    total = sum(len(ids) for rows in shards.values() for ids in rows)
    label = "+".join(type(s).__name__ for s in stores)
    bar = tqdm(total=total, desc=f"target {label}", unit="tok", disable=not show_progress or not total)

    def batches(rows: list[list[int]]) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        order = sorted(
            (i for i in range(len(rows)) if rows[i]), key=lambda i: len(rows[i])
        )  # limit padding; empty rows: none
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)  # (n, T), right-padded
            attention = torch.zeros_like(ids)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                attention[j, : len(rows[i])] = 1
            autocast = torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=bf16)
            with torch.no_grad(), autocast:
                hidden = target.model(
                    input_ids=ids.to(target.device),
                    attention_mask=attention.to(target.device),
                    output_hidden_states=True,
                    use_cache=False,
                ).hidden_states
                arrays = [store.from_hidden(hidden).float() for store in stores]  # each (n, T, width)
            for store, arr in zip(stores, arrays):
                if store.dtype == np.float16 and float(arr.abs().max()) > FLOAT16_MAX:
                    raise OverflowError(
                        f"target outputs reach {float(arr.abs().max()):.0f}, beyond float16; cannot cache them as float16"
                    )
            yield idx, arrays
            bar.update(int(attention.sum()))

    for shard, rows in shards.items():
        yield shard, np.cumsum([0] + [len(r) for r in rows]), batches(rows)
    bar.close()


def build_stores(
    stores: list[PositionStore],
    shards: dict[str, list[list[int]]],
    batch_size: int = 8,
    show_progress: bool = True,
    bf16: bool = False,
) -> None:
    """Fill every store's missing shards from one target forward per batch (not one per store),
    under bf16 autocast with ``bf16``.

    All stores must share one target. ``shards`` maps a shard name to its sequences' token ids (in
    row order); a shard every store already holds is skipped, so a rerun after a kill resumes.
    """
    if not stores:
        return
    for store in stores:
        store.dir.mkdir(parents=True, exist_ok=True)
    precision = "bf16" if bf16 else "fp32"
    # group the missing shards by the stores that lack them: each group runs the target once per batch
    groups: dict[tuple[int, ...], dict[str, list[list[int]]]] = {}
    for name, rows in shards.items():
        missing = tuple(i for i, s in enumerate(stores) if not s._valid(name, rows, precision))
        if missing:
            groups.setdefault(missing, {})[name] = rows
    for key, todo in groups.items():
        group = [stores[i] for i in key]
        for shard, offsets, batches in _target_outputs(group, todo, batch_size, show_progress, bf16):
            tmps = [s._paths(shard)[0].with_name(s._paths(shard)[0].name + ".tmp") for s in group]
            outs = [
                np.memmap(t, dtype=s.dtype, mode="w+", shape=(int(offsets[-1]), s.width)) for s, t in zip(group, tmps)
            ]
            for idx, arrays in batches:
                for store, out, arr in zip(group, outs, arrays):
                    arr = arr.cpu()
                    for j, i in enumerate(idx):
                        out[offsets[i] : offsets[i + 1]] = (
                            arr[j, : offsets[i + 1] - offsets[i]].numpy().astype(store.dtype)
                        )
            for store, out, tmp in zip(group, outs, tmps):
                out.flush()
                os.replace(tmp, store._paths(shard)[0])
                _write_index(store, shard, todo[shard], offsets, precision)
            del outs


class ResidentStore:
    """A :class:`PositionStore`'s arrays held in memory on ``device`` instead of on disk: the
    choice on a GPU, where the target's forward over the whole data set takes seconds and a disk
    cache would take tens of GB. Same :meth:`batch` as the on-disk store. Build them with
    :meth:`fill`, which runs the target once per batch for all of them.
    """

    def __init__(self, width: int, data: torch.Tensor, start: dict[tuple[str, int], tuple[int, int]]) -> None:
        self.width = width
        self.data = data  # (total positions, width): every position of every sequence
        self.device = data.device
        self.start = start  # (shard, row) -> (first position in data, length)

    @classmethod
    def fill(
        cls,
        stores: list[PositionStore],
        shards: dict[str, list[list[int]]],
        device: torch.device | str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        bf16: bool = False,
    ) -> list["ResidentStore"]:
        """Resident copies of ``stores`` (their ``from_hidden``, ``width`` and ``dtype``; their
        directories are never touched) for the sequences of ``shards`` (name -> token ids in row
        order), on ``device`` (default: the target's)."""
        device = torch.device(device) if device is not None else stores[0].target.device
        total = sum(len(ids) for rows in shards.values() for ids in rows)
        dtypes = [torch.float16 if s.dtype == np.float16 else torch.float32 for s in stores]
        datas = [torch.empty((total, s.width), dtype=d, device=device) for s, d in zip(stores, dtypes)]
        start: dict[tuple[str, int], tuple[int, int]] = {}
        base = 0
        for shard, offsets, batches in _target_outputs(stores, shards, batch_size, show_progress, bf16):
            for row in range(len(offsets) - 1):
                start[(shard, row)] = (base + int(offsets[row]), int(offsets[row + 1] - offsets[row]))
            for idx, arrays in batches:
                for data, arr in zip(datas, arrays):
                    arr = arr.to(device, data.dtype)
                    for j, i in enumerate(idx):
                        first, n = start[(shard, i)]
                        data[first : first + n] = arr[j, :n]
            base += int(offsets[-1])
        return [cls(s.width, data, start) for s, data in zip(stores, datas)]

    def batch(
        self, keys: list[tuple[str, int]], lengths: list[int], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Right-padded arrays of several sequences: (N, max length, width) float32, on ``device``
        (default: where the arrays live)."""
        for key, n in zip(keys, lengths):
            if key not in self.start:
                raise KeyError(f"sequence {key[0]}:{key[1]} is not in this resident store")
            if n > self.start[key][1]:
                raise ValueError(f"sequence {key[0]}:{key[1]} has {self.start[key][1]} positions, {n} requested")
        width = max(lengths)
        first = torch.tensor([self.start[k][0] for k in keys]).unsqueeze(1)  # (N, 1)
        steps = torch.arange(width).unsqueeze(0)  # (1, T)
        valid = steps < torch.tensor(lengths).unsqueeze(1)  # (N, T)
        index = torch.where(valid, first + steps, 0).to(self.device)
        out = self.data[index].float() * valid.to(self.device).unsqueeze(-1)  # (N, T, width)
        return out if device is None else out.to(device)
