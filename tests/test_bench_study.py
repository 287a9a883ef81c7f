"""Speedup study (dllm_spec/bench/study.py): the quick configuration produces its CSV, summary and plots, and a rerun resumes
(no run is repeated)."""

from __future__ import annotations

import csv

import pytest

from dllm_spec import DiffusionSpeculator
from dllm_spec.bench.study import StudyConfig, run_study
from dllm_spec.drafters import NullDrafter
from dllm_spec.jsonl import read_records
from dllm_spec.prompt import Prompt
from tests.conftest import CharTokenizer


def test_quick_study_writes_csv_summary_and_plots_and_resumes(target, tmp_path):
    spec = DiffusionSpeculator(target, CharTokenizer(), NullDrafter())
    prompts = [Prompt("a", "code", "abcabcabc"), Prompt("b", "chat", "hello there hello")]
    cfg = StudyConfig(
        lengths=(8, 16),
        drafters=("prompt-lookup",),
        policies=("fixed:4", "adaptive"),
        temperatures=(0.0, 1.0),
        peers=("hf-prompt-lookup", "hf-assisted", "hf-static"),
        repeats=1,
        per_category=1,
    )
    out = run_study(spec, prompts, cfg, tmp_path / "study")
    for name in (
        "results.csv",
        "summary.md",
        "speedup_vs_length.png",
        "tau_by_category.png",
        "acceptance_by_position.png",
        "records.jsonl",
    ):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "results.csv")))
    variants = {r["variant"] for r in rows}
    assert variants == {
        "none",
        "prompt-lookup@fixed:4",
        "prompt-lookup@adaptive",
        "hf-prompt-lookup",
        "hf-assisted",
        "hf-static",
    }
    assert all(float(r["speedup"]) > 0 for r in rows)
    assert {r["variant"]: r for r in rows if r["length"] == "8" and r["temperature"] == "0.0"}["none"][
        "speedup"
    ] == "1.000"
    n = len(read_records(out / "records.jsonl"))
    assert n == 2 * 2 * 2 * 6  # lengths x temperatures x prompts x variants
    run_study(spec, prompts, cfg, out)
    assert len(read_records(out / "records.jsonl")) == n


def test_study_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lengths"):
        StudyConfig(lengths=(0,))
    with pytest.raises(ValueError, match="peers"):
        StudyConfig(peers=("vllm",))
    with pytest.raises(ValueError, match="greedily"):  # refused before any run, not halfway through
        StudyConfig(peers=("llama.cpp",), temperatures=(0.0, 1.0))
