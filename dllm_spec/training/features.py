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

Each shard's index records the sequence lengths and a SHA-1 of the token ids, so a changed shard
or a different target/layer set is recomputed instead of silently reused. Files are written
atomically (temporary name + rename): a kill loses at most the shard in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    name = str(getattr(target.config, "_name_or_path", "")) + json.dumps(target.config.to_diff_dict(), sort_keys=True, default=str)
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return Path(root) / digest / ("L" + "-".join(str(i) for i in layer_ids))


@torch.no_grad()
def compute_features(target: PreTrainedModel, ids: torch.Tensor, attention: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
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

    def _valid(self, shard: str, rows: list[list[int]]) -> bool:
        data, index = self._paths(shard)
        if not (data.is_file() and index.is_file()):
            return False
        meta = json.loads(index.read_text())
        return meta.get("ids_sha1") == _ids_digest(rows) and meta.get("width") == self.width

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
        return torch.from_numpy(np.array(arr[start: start + length], dtype=np.float32))  # a writable float32 copy

    def batch(self, keys: list[tuple[str, int]], lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
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


def _write_index(store: PositionStore, shard: str, rows: list[list[int]], offsets: np.ndarray) -> None:
    meta = {"ids_sha1": _ids_digest(rows), "width": store.width, "offsets": offsets.tolist(), "kind": type(store).__name__}
    write_atomic(store._paths(shard)[1], json.dumps(meta))


def build_stores(stores: list[PositionStore], shards: dict[str, list[list[int]]], batch_size: int = 8,
                 show_progress: bool = True) -> None:
    """Fill every store's missing shards from one target forward per batch (not one per store).

    All stores must share one target. ``shards`` maps a shard name to its sequences' token ids (in
    row order); a shard every store already holds is skipped, so a rerun after a kill resumes.
    """
    if not stores:
        return
    target = stores[0].target
    if any(s.target is not target for s in stores):
        raise ValueError("build_stores needs stores of one target")
    for store in stores:
        store.dir.mkdir(parents=True, exist_ok=True)
    todo = {name: [s for s in stores if not s._valid(name, rows)] for name, rows in shards.items()}
    todo = {name: need for name, need in todo.items() if need}
    total = sum(len(ids) for name in todo for ids in shards[name])
    label = "+".join(type(s).__name__ for s in stores)
    bar = tqdm(total=total, desc=f"target {label}", unit="tok", disable=not show_progress or not total)
    device = target.device
    for shard, need in todo.items():
        rows = shards[shard]
        offsets = np.cumsum([0] + [len(r) for r in rows])
        tmps = [s._paths(shard)[0].with_name(s._paths(shard)[0].name + ".tmp") for s in need]
        outs = [np.memmap(t, dtype=s.dtype, mode="w+", shape=(int(offsets[-1]), s.width)) for s, t in zip(need, tmps)]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # limit padding
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)  # (n, T), right-padded
            attention = torch.zeros_like(ids)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                attention[j, : len(rows[i])] = 1
            with torch.no_grad():
                hidden = target.model(input_ids=ids.to(device), attention_mask=attention.to(device),
                                      output_hidden_states=True, use_cache=False).hidden_states
                for store, out in zip(need, outs):
                    arr = store.from_hidden(hidden).float().cpu()  # (n, T, width)
                    if store.dtype == np.float16:
                        peak = float(arr.abs().max())
                        if peak > FLOAT16_MAX:
                            raise OverflowError(f"target outputs reach {peak:.0f}, beyond float16; cannot cache them as float16")
                    for j, i in enumerate(idx):
                        out[offsets[i]: offsets[i + 1]] = arr[j, : len(rows[i])].numpy().astype(store.dtype)
            bar.update(int(attention.sum()))
        for store, out, tmp in zip(need, outs, tmps):
            out.flush()
            del out
            os.replace(tmp, store._paths(shard)[0])
            _write_index(store, shard, rows, offsets)
        del outs
    bar.close()
