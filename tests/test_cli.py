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
        monkeypatch.setattr(
            importlib.import_module(module), "main", lambda argv, name=name: seen.setdefault(name, argv)
        )
    cli.main(["train", "--data", "d", "--out", "o"])
    cli.main(["traces", "in.jsonl", "--out", "t.jsonl"])
    cli.main(["study", "--quick"])
    assert seen == {
        "train": ["--data", "d", "--out", "o"],
        "traces": ["in.jsonl", "--out", "t.jsonl"],
        "study": ["--quick"],
    }


def test_export_writes_a_dflash_drafter_in_each_layout(target, tmp_path, capsys):
    import json

    import torch

    from dllm_spec.cli import main
    from dllm_spec.drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, BlockDiffusionModel

    cfg = BlockDiffusionConfig.for_target(
        target, num_layers=1, num_target_layers=2, block_size=6, architecture="dflash", mask_token_id=3
    )
    BlockDiffusionDrafter(BlockDiffusionModel(cfg)).save_pretrained(tmp_path / "ours")
    main(["export", str(tmp_path / "ours"), "--format", "transformers", "--out", str(tmp_path / "tf")])
    main(
        ["export", str(tmp_path / "ours"), "--format", "dflash", "--out", str(tmp_path / "zlab"), "--dtype", "bfloat16"]
    )
    main(["export", str(tmp_path / "ours"), "--format", "dllm", "--out", str(tmp_path / "copy"), "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "tf" / "config.json").read_text())["model_type"] == "muse_glimmer_assistant"
    zlab = json.loads((tmp_path / "zlab" / "config.json").read_text())
    assert zlab["architectures"] == ["DFlashDraftModel"] and zlab["dflash_config"]["mask_token_id"] == 3
    assert zlab["dtype"] == "bfloat16"
    copy = BlockDiffusionDrafter.from_pretrained(tmp_path / "copy")
    assert copy.model.fuse.weight.dtype == torch.bfloat16 and copy.config.architecture == "dflash"
    assert "wrote" in capsys.readouterr().out
