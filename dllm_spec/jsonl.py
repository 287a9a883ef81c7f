"""Crash-safe JSONL: append one record per write + fsync; reading drops a torn trailing line
(and cuts it off only in a file the reader appends to)."""

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


def read_records(path: str | os.PathLike, repair: bool = True) -> list[dict]:
    """Every complete record. A torn trailing line (a kill mid-write) is skipped, and with
    ``repair`` (only for a file this process appends to) truncated away; a malformed line before
    it is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        return []
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(p, "r+b") as fh:
            fh.truncate(end)
    records = []
    for n, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{n}: not a JSON record ({exc.msg})") from None
    return records


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` (or raw bytes) atomically (temporary file + rename). A symlink
    is followed (its target is replaced, the link kept); a new file gets the umask's permissions; a
    failed write (a full disk) removes the temporary file and leaves ``path`` as it was."""
    p = Path(os.path.realpath(path))
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if p.is_file():
            os.chmod(tmp, p.stat().st_mode & 0o7777)  # an existing file keeps its permissions
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
