"""Pieces every drafter trainer shares: the learning-rate schedule and atomic checkpoint writes."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                  time_fraction: Callable[[], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate at ``max_steps``.

    ``time_fraction``: the fraction of a time budget spent (0..1); the decay then follows whichever
    of steps or time is further along, so a run stopped by its budget has annealed too."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction())
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_dir_atomic(out: Path, name: str, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary directory, then replace ``out/name`` with it (a kill never
    leaves a half-written checkpoint under the final name)."""
    tmp = out / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    final = out / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
