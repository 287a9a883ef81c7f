"""The command line (dllm_spec/cli.py): parsing, and the subcommands that own their arguments.
Bad CLI input is in tests/test_bad_inputs.py."""

from __future__ import annotations

from dllm_spec.cli import build_parser


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
