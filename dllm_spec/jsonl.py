"""Crash-safe JSONL: append one record per write + fsync; reading drops a torn trailing line."""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line with a single write, flushed and fsync'd."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    with open(path, "ab") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every complete record; a torn trailing line (a kill mid-write) is truncated away."""
    p = Path(path)
    if not p.is_file():
        return []
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(p, "r+b") as fh:
            fh.truncate(end)
    return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` (or raw bytes) atomically (temporary file + rename)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
