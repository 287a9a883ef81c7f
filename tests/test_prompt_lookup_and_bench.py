"""Prompt lookup matching, the bench's prompt-file parsing and summaries, and the CLI parser."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import propose

from dllm_spec.bench import load_prompt_file, summarize
from dllm_spec.cli import build_parser
from drafters import PromptLookupDrafter
from verify.sampling import SamplingParams


def test_prompt_lookup_copies_the_continuation_of_the_latest_longest_match():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 6, 7]])
    proposal = propose(PromptLookupDrafter(max_ngram=2), ids, 3, SamplingParams(), None)
    assert proposal.tokens.tolist() == [[3, 4, 2]]  # the most recent earlier "6 7" is followed by 3 4 2
    assert proposal.q is None and proposal.confidence.shape == (1, 3)


def test_prompt_lookup_without_match_proposes_nothing():
    proposal = propose(PromptLookupDrafter(), torch.tensor([[1, 2, 3, 4]]), 5, SamplingParams(), None)
    assert proposal.length == 0


def test_prompt_lookup_rejects_invalid_ngram_sizes():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


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
        rows.append(dict(repeat=rep, category="code", drafter="none", new_tokens=100, wall_time_s=10.0, target_forwards=100, identical_to_ar=True))
        rows.append(dict(repeat=rep, category="code", drafter="pld", new_tokens=100, wall_time_s=5.0, target_forwards=40, identical_to_ar=True))
    summary = summarize(rows)
    assert summary["pld"]["all"]["speedup"] == pytest.approx(2.0)
    assert summary["pld"]["code"]["tau"] == pytest.approx(2.5)
    assert summary["none"]["all"]["speedup"] == pytest.approx(1.0)


def test_cli_parses_generate_and_bench():
    args = build_parser().parse_args(["generate", "hi", "--baseline", "--max-new-tokens", "5"])
    assert args.baseline and args.max_new_tokens == 5
    args = build_parser().parse_args(["bench", "--drafters", "prompt-lookup", "--repeats", "1"])
    assert args.drafters == "prompt-lookup" and args.repeats == 1


def test_cli_hands_train_traces_and_study_their_own_options(monkeypatch):
    import importlib

    from dllm_spec import cli

    seen = {}
    for name, module in cli.PASS_THROUGH.items():
        monkeypatch.setattr(importlib.import_module(module), "main", lambda argv, name=name: seen.setdefault(name, argv))
    cli.main(["train", "--data", "d", "--out", "o"])
    cli.main(["traces", "in.jsonl", "--out", "t.jsonl"])
    cli.main(["study", "--quick"])
    assert seen == {"train": ["--data", "d", "--out", "o"], "traces": ["in.jsonl", "--out", "t.jsonl"], "study": ["--quick"]}
