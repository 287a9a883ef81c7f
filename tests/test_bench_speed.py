"""The batch-1 side-by-side (dllm_spec/bench/speed.py): its result file and summaries."""

from __future__ import annotations

import pytest

from dllm_spec.bench.speed import format_table, run_bench, summarize


def test_summary_reports_speedup_as_ratio_to_the_baseline():
    rows = []
    for rep in range(3):
        rows.append(
            dict(
                repeat=rep,
                category="code",
                drafter="none",
                new_tokens=100,
                wall_time_s=10.0,
                target_forwards=100,
                identical_to_ar=True,
            )
        )
        rows.append(
            dict(
                repeat=rep,
                category="code",
                drafter="pld",
                new_tokens=100,
                wall_time_s=5.0,
                target_forwards=40,
                identical_to_ar=True,
            )
        )
    summary = summarize(rows)
    assert summary["pld"]["all"]["speedup"] == pytest.approx(2.0)
    assert summary["pld"]["code"]["tau"] == pytest.approx(2.5)
    assert summary["none"]["all"]["speedup"] == pytest.approx(1.0)
    assert "| pld | code | 2.50 |" in format_table(summary)


def test_the_result_holds_config_summary_records_and_failed_peers(target):
    from dllm_spec import DiffusionSpeculator
    from dllm_spec.drafters import PromptLookupDrafter
    from dllm_spec.prompt import Prompt
    from tests.conftest import CharTokenizer

    spec = DiffusionSpeculator(target, CharTokenizer(), PromptLookupDrafter())
    prompts = [Prompt("a", "code", "abcabcabc"), Prompt("b", "chat", "hello hello")]
    result = run_bench(spec, ["prompt-lookup@fixed:2"], prompts, max_new_tokens=6, repeats=2)
    assert list(result) == ["config", "summary", "records", "failed"] and result["failed"] == {}
    assert list(result["config"]) == [
        "max_new_tokens",
        "repeats",
        "block_size",
        "temperature",
        "dtype",
        "device",
        "threads",
        "kernels",
        "prompts",
    ]
    assert result["config"]["prompts"] == 2 and result["config"]["dtype"] == "torch.float32"
    runs = [(r["repeat"], r["prompt_id"], r["drafter"]) for r in result["records"]]
    assert runs == [
        (0, "a", "none"),
        (0, "a", "prompt-lookup@fixed:2"),
        (0, "b", "none"),
        (0, "b", "prompt-lookup@fixed:2"),
        (1, "a", "prompt-lookup@fixed:2"),  # the order rotates every repeat
        (1, "a", "none"),
        (1, "b", "prompt-lookup@fixed:2"),
        (1, "b", "none"),
    ]
    assert all(r["identical_to_ar"] for r in result["records"])  # greedy speculation is lossless
    assert set(result["summary"]) == {"none", "prompt-lookup@fixed:2"}
    assert set(result["summary"]["none"]) == {"chat", "code", "all"}
