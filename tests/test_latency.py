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


def _fast_measurement(monkeypatch) -> list[int]:
    """measure_latency replaced by a fixed curve; returns the list of row counts measured."""
    measured: list[int] = []

    def fake(model, points, rows=1, repeats=7, context=128):
        measured.append(rows)
        return latency.LatencyCurve({k: 0.01 * k for k in points})

    monkeypatch.setattr(latency, "measure_latency", fake)
    return measured


def test_a_corrupt_latency_cache_is_said_measured_again_and_rewritten(tmp_path, monkeypatch, capsys):
    """A cache file holding ``null`` once gave a traceback on every run until deleted by hand."""
    import json

    measured = _fast_measurement(monkeypatch)
    model = tiny_llama(0)
    path = latency._path(model, tmp_path, 1)
    path.write_text("null")
    curve = latency.load_or_measure(model, tmp_path)
    err = capsys.readouterr().err
    assert measured == [1] and curve(2) == 0.02 and "is corrupt; measuring it again" in err
    assert "measuring the target's forward latency" in err  # the long first measurement says so up front
    assert json.loads(path.read_text())["2"] == 0.02
    assert latency.load_or_measure(model, tmp_path)(2) == 0.02 and measured == [1]  # cached now


def test_a_read_only_latency_cache_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import os

    if os.geteuid() == 0:
        monkeypatch.setattr(
            latency.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
        )
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        _fast_measurement(monkeypatch)
        for rows in (1, 2):
            assert latency.measure_and_cache(tiny_llama(0), cache, rows)(1) == 0.01
    finally:
        cache.chmod(0o700)
    err = capsys.readouterr().err
    assert err.count("cannot write the latency cache") == 1 and "Permission denied" in err
    assert not list(cache.iterdir())
