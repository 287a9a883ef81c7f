"""Training sequences from distillation shards: the train / held-out split every trainer uses."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sequence:
    """One prompt + response of the distillation data (token ids), and where it came from."""

    ids: list[int]
    prompt_len: int
    greedy: bool  # the target's own greedy continuation (offline tau is measured on these)
    shard: str = ""
    row: int = 0  # row within the shard: the feature caches are indexed by (shard, row)
    # False: text the target did not write (temperature None in the shard), labelled by the target
    on_policy: bool = True


SHARD_KEYS = ("prompt_id", "prompt_ids", "response_ids", "temperature")


def _shards(data_dir: str | os.PathLike) -> Iterator[tuple[str, list[dict]]]:
    """(shard name, records) of every ``shard-*.jsonl.gz`` in ``data_dir``, in name order (the
    layout of :func:`dllm_spec.data.distill.iter_shards`); a shard that is not gzip'd JSONL, is
    truncated, or has a record without the keys training reads is a ValueError naming it and the line."""
    for path in sorted(Path(data_dir).glob("shard-*.jsonl.gz")):
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            raise ValueError(f"shard {path}: not a complete gzip'd JSONL file ({type(exc).__name__}: {exc})") from None
        records = []
        for n, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"shard {path}:{n}: malformed JSON ({exc.msg})") from None
            if (
                not isinstance(record, dict)
                or any(k not in record for k in SHARD_KEYS)
                or not isinstance(record["prompt_ids"], list)
                or not isinstance(record["response_ids"], list)
            ):
                raise ValueError(
                    f"shard {path}:{n}: a record needs the keys {', '.join(SHARD_KEYS)} (token ids as lists)"
                )
            records.append(record)
        yield path.name.removesuffix(".jsonl.gz"), records


DataDirs = str | os.PathLike | list[str | os.PathLike] | tuple[str | os.PathLike, ...]


def _dirs(data: DataDirs) -> list[Path]:
    return [Path(d) for d in ([data] if isinstance(data, (str, os.PathLike)) else data)]


def _split(records_of: Iterator[tuple[str, list[dict]]], prefix: str, max_len: int, heldout_mod: int):
    """(sequence, held out?) for every usable record; rows numbered per shard, shard names prefixed."""
    for shard, records in records_of:
        row = 0
        for r in records:
            if not r["response_ids"]:
                continue
            on_policy = r["temperature"] is not None
            ids = (r["prompt_ids"] + r["response_ids"])[:max_len]
            seq = Sequence(ids, len(r["prompt_ids"]), r["temperature"] == 0, f"{prefix}{shard}", row, on_policy)
            if seq.prompt_len >= len(seq.ids) - 1:
                continue
            row += 1
            # the turns of one conversation (records with a conversation_id) land on the same side
            key = str(r.get("conversation_id", r["prompt_id"]))
            yield seq, int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % heldout_mod == 0


def load_sequences(
    data_dir: DataDirs, max_len: int, heldout_mod: int, eval_dir: DataDirs | None = None
) -> tuple[list[Sequence], list[Sequence]]:
    """(train, held-out) sequences from distillation shards in one or several directories; held out
    by conversation (or prompt-id) hash, so one conversation's turns never straddle the split, in
    every directory alike. With ``eval_dir`` the held-out sequences come from there instead (the
    held-out ones of ``data_dir`` are then left out altogether): its held-out split for a directory
    also in ``data_dir``, every sequence for one that is not (e.g. the target's responses to
    conversations that no training directory holds). With several directories, shard
    names carry their directory's name (``distill-shard-00003``), so their feature caches never
    collide. Each sequence remembers its (shard, row) for the feature cache. Refuses data with no
    training sequence, or with no greedy held-out sequence (the offline tau every evaluation
    measures)."""
    dirs, evals = _dirs(data_dir), _dirs(eval_dir) if eval_dir is not None else None
    everything = list(dict.fromkeys(dirs + (evals or [])))
    prefixed = len(everything) > 1
    names_seen = [d.name for d in everything]
    if prefixed and len(set(names_seen)) < len(names_seen):
        raise ValueError(
            f"data directories {', '.join(map(str, everything))}: two share a name, and shard names carry it"
        )
    train, held = [], []
    for d in everything:  # each directory read once, in order
        prefix = f"{d.name}-" if prefixed else ""
        for seq, is_held in _split(_shards(d), prefix, max_len, heldout_mod):
            if d not in dirs:  # an evaluation-only directory: all of it
                held.append(seq)
            elif not is_held:
                train.append(seq)
            elif evals is None or d in evals:
                held.append(seq)
    names = ", ".join(str(d) for d in dirs)
    if not train:
        raise ValueError(f"no training sequences found in {names}")
    if not any(s.greedy for s in held):
        where = f"--eval-data {', '.join(str(d) for d in evals)}" if evals is not None else f"--data {names}"
        raise ValueError(
            f"{where}: no greedy held-out sequence to evaluate on (1 prompt id in --heldout-mod "
            f"{heldout_mod} is held out, {len(held)} held out here): add data or lower --heldout-mod"
        )
    return train, held


def has_gaps(sequences: list[Sequence]) -> bool:
    """Whether some shard of ``sequences`` lacks rows (a position cap, or held-out rows read from
    another directory than the training ones): the caches then need :func:`shard_rows`'s gaps."""
    rows: dict[str, set[int]] = {}
    for s in sequences:
        rows.setdefault(s.shard, set()).add(s.row)
    return any(len(r) != max(r) + 1 for r in rows.values())


def cap_positions(train: list[Sequence], max_positions: int, seed: int) -> list[Sequence]:
    """At most ``max_positions`` token positions of ``train`` (0: all): greedy sequences first,
    then sampled ones, each group in a seeded random order. Bounds the memory of resident features
    (~6 KB a position) when the data outgrows the device."""
    if max_positions <= 0 or sum(len(s.ids) for s in train) <= max_positions:
        return train
    rng = random.Random(seed)
    greedy, sampled = [s for s in train if s.greedy], [s for s in train if not s.greedy]
    rng.shuffle(greedy)
    rng.shuffle(sampled)
    kept, total = [], 0
    for seq in greedy + sampled:
        if total + len(seq.ids) <= max_positions:
            kept.append(seq)
            total += len(seq.ids)
    return kept


def shard_rows(sequences: list[Sequence], allow_gaps: bool = False) -> dict[str, list[list[int]]]:
    """Token ids of ``sequences`` grouped by shard, in row order (what the feature cache stores).
    The caches are indexed by row, so every row of a shard must be present (pass train + held-out);
    with ``allow_gaps`` (a position cap left some out) a missing row is empty and gets no features."""
    shards: dict[str, dict[int, list[int]]] = {}
    for s in sequences:
        shards.setdefault(s.shard, {})[s.row] = s.ids
    if allow_gaps:
        return {name: [rows.get(i, []) for i in range(max(rows) + 1)] for name, rows in sorted(shards.items())}
    for name, rows in shards.items():
        if sorted(rows) != list(range(len(rows))):
            raise ValueError(
                f"shard {name}: rows {sorted(set(range(max(rows) + 1)) - set(rows))[:5]}... are missing; "
                "the caches are indexed by row, so pass every sequence of the shard"
            )
    return {name: [rows[i] for i in sorted(rows)] for name, rows in sorted(shards.items())}


def length_bucketed_order(sequences: list[Sequence], rng: random.Random, bucket: int = 64, chunk: int = 8) -> list[int]:
    """One epoch's order of ``sequences``: shuffled, grouped into ``chunk``-sized runs of similar
    length (less padding per batch), the runs shuffled."""
    order = list(range(len(sequences)))
    rng.shuffle(order)
    order.sort(key=lambda i: len(sequences[i].ids) // bucket)  # stable: shuffled within buckets
    chunks = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    rng.shuffle(chunks)
    return [i for c in chunks for i in c]
