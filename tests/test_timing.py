"""Cycle timings (dllm_spec/timing.py): on CPU plain clock differences; on CUDA recorded events,
read after the fact, with no device-wide synchronisation per phase (events mocked: no GPU here)."""

from __future__ import annotations

import time

import torch

from dllm_spec.timing import CycleClock, wall_clock


def test_cpu_marks_are_clock_readings():
    clock = CycleClock(torch.device("cpu"))
    a = clock.mark()
    time.sleep(0.01)
    b = clock.mark()
    assert 0.009 < clock.seconds(a, b) < 1.0


class FakeEvent:
    recorded: list["FakeEvent"] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None
        self.waited = False

    def record(self) -> None:
        self.at = len(FakeEvent.recorded) * 5.0  # milliseconds
        FakeEvent.recorded.append(self)

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, other: "FakeEvent") -> float:
        assert other.waited, "read an event's time only after waiting for that event"
        return other.at - self.at


def test_cuda_marks_are_events_and_never_synchronise_the_device(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(a))
    FakeEvent.recorded = []
    clock = CycleClock(torch.device("cuda"))
    t0, t1, t2 = clock.mark(), clock.mark(), clock.mark()
    assert syncs == [] and len(FakeEvent.recorded) == 3
    assert clock.seconds(t0, t1) == 0.005 and clock.seconds(t0, t2) == 0.010
    assert syncs == []  # only the events were waited for
    wall_clock(torch.device("cuda"))
    assert len(syncs) == 1  # a whole-generation wall time does synchronise, once
