"""Latency measurement (dllm_spec/latency.py): every k is timed in round-robin passes after a
warm-up pass, and the curve keeps the median per k."""

from __future__ import annotations

from dllm_spec import latency
from tests.conftest import tiny_llama


def test_measure_latency_times_every_k_in_round_robin_passes_and_keeps_medians(monkeypatch):
    model = tiny_llama(0)
    fed: list[int] = []
    now = [0.0]
    forward = model.forward

    def timed_forward(*args, **kwargs):
        """A fake clock that only forwards advance: k tokens take 10 * k ms, one forward (a slow spell) 1 s more."""
        k = kwargs["input_ids"].shape[1]
        fed.append(k)
        now[0] += 0.01 * k + (1.0 if len(fed) == 6 else 0.0)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", timed_forward)
    monkeypatch.setattr(latency.time, "perf_counter", lambda: now[0])
    curve = latency.measure_latency(model, points=(1, 2, 4), context=8, repeats=3)
    assert fed == [8] + [1, 2, 4] * 4  # the prefill, one warm-up pass, then three passes over every k
    assert set(curve.points) == {1, 2, 4}
    for k, seconds in curve.points.items():
        assert abs(seconds - 0.01 * k) < 1e-9, (k, seconds)  # the slow sample is outvoted by the median
