"""scripts/collect_training_runs.py: finished runs' curves into one result file, the table that
BENCHMARKS.md renders from it, and a clear error for a directory that is not a finished run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


def _run(path, taus):
    path.mkdir()
    (path / "train_config.json").write_text(json.dumps({"lr": 2e-4}))
    summary = dict(steps=200, train_tokens_seen=1_000_000, train_sequences=10, train_response_tokens=500_000)
    (path / "eval.json").write_text(json.dumps(summary))
    log = [
        {"step": 100 * i, "tokens": 5000 * i, "time_s": i, "heldout_tau": t, "train_tau": t} for i, t in enumerate(taus)
    ]
    log.insert(1, {"step": 1, "loss": 3.0, "tokens": 50, "time_s": 0.1})  # a training step, not an evaluation
    (path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return path


def test_runs_are_collected_and_tabled(tmp_path, monkeypatch):
    collect, tables = load_script("collect_training_runs"), load_script("benchmark_tables")
    a, b = _run(tmp_path / "a", [2.2, 2.5, 2.4]), _run(tmp_path / "b", [2.2, 2.1, 2.3])
    out = tmp_path / "bench" / "mix.json"
    out.parent.mkdir()
    collect.main([f"first={a}", f"second={b}", "--data", "first=shards 0-3", "--description", "d", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["runs"]] == ["first", "second"]
    assert [c["step"] for c in result["runs"][0]["curve"]] == [0, 100, 200]
    monkeypatch.setattr(tables, "BENCH", out.parent)
    table = tables.data_mix_table("mix.json")
    assert "| first | shards 0-3 | 10 | 0.50M | 200 | 1.0M | 2.20 | **2.50** (100) |" in table
    assert "**2.30** (200)" in table


def test_a_directory_that_is_not_a_finished_run_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no train_config.json"):
        load_script("collect_training_runs").read_run(tmp_path / "empty")
