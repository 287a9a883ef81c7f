"""One prompt type and one prompt-file parser, shared by the prompt set, traces, bench and study."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

#: share of the project's prompt set held out from training (by a hash of the prompt text)
HELDOUT_FRACTION = 0.03


@dataclass(frozen=True)
class Prompt:
    """One user prompt: ``id``, ``category`` (for per-category reports), ``text``, optional ``system``."""

    id: str
    category: str
    text: str
    system: str | None = None

    @property
    def split(self) -> str:
        """``heldout`` or ``train``: a hash of the text, so it never changes when a prompt set grows."""
        digest = int(hashlib.sha1(self.text.encode()).hexdigest()[:8], 16)
        return "heldout" if digest / 0xFFFFFFFF < HELDOUT_FRACTION else "train"


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Parse a JSONL (``id``, ``prompt``, optional ``system`` and ``category``) or plain-text prompt
    file (one prompt per line, id = line number); errors name the file and line."""
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the prompt file {path}: {exc}") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{n}: missing or empty 'prompt'")
            pid = str(record.get("id", n))
            system = record.get("system")
            category = str(record.get("category", "all"))
        else:
            pid, prompt, system, category = str(n), line, None, "all"
        if pid in seen:
            raise ValueError(f"{path}:{n}: duplicate id {pid!r} (first seen on line {seen[pid]})")
        seen[pid] = n
        prompts.append(Prompt(pid, category, prompt, system))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
