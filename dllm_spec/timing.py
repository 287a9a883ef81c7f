"""Timing a cycle's phases without adding device synchronisations.

On CPU a mark is ``time.perf_counter()``. On CUDA a mark is a recorded ``torch.cuda.Event``: the
host does not wait for the device to reach it, and the duration between two marks is read only
when asked, after the cycle has synchronised anyway (the loop reads the accepted counts on the
host). ``torch.cuda.synchronize`` between phases would serialise the host with the device three
times per cycle, which at batch 1 on a GPU costs more than the phases themselves.
"""

from __future__ import annotations

import time

import torch


class CycleClock:
    """``mark()`` returns an opaque mark; ``seconds(a, b)`` the time from mark a to mark b."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()  # waits for this event only; by the time the loop asks it has long passed
        return a.elapsed_time(b) / 1000.0


def wall_clock(device: torch.device) -> float:
    """Wall time for a whole generation or a row's lifetime: synchronises a CUDA device first
    (once per generation or finished row, never per phase)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
