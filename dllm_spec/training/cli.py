"""Command line of the drafter-training pipeline (``dllm-spec train``; ``accelerate launch -m dllm_spec.training.cli`` for several processes).

``--drafter block-diffusion`` (default) trains the target-conditioned block-diffusion drafter;
``--drafter ar`` / ``--drafter mdlm`` train the token-only comparison drafters on the same data.
Every field of the matching config dataclass is a flag (``--block-size``, ``--max-steps``, ...).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch

from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion
from dllm_spec.training.token_drafters import OBJECTIVES, TokenDrafterConfig, train_token_drafter

CONFIGS = {"block-diffusion": TrainConfig, "ar": TokenDrafterConfig, "mdlm": TokenDrafterConfig}


def build_parser(drafter: str = "block-diffusion") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dllm-spec train", description="Train a drafter on self-distillation data.")
    p.add_argument(
        "--drafter",
        choices=sorted(CONFIGS),
        default="block-diffusion",
        help="block-diffusion (default), or the token-only comparison drafters ar / mdlm",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="one or more directories of distillation shards (scripts/generate_distill_data.py); records with "
        "temperature null (--prompts sharegpt-text) are off-policy text, trained on the target's distribution alone",
    )
    p.add_argument(
        "--eval-data",
        default=None,
        nargs="+",
        help="directories whose held-out greedy sequences the evaluations use (default: those of --data); "
        "the held-out split is by conversation hash, the same in every directory",
    )
    p.add_argument(
        "--out", required=True, help="run directory: checkpoint/ (resume), best/ (the drafter), train_log.jsonl"
    )
    p.add_argument("--target", default=None, help="HF id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop (after a checkpoint) when this many minutes have passed; the learning rate anneals within the budget",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--mixed-precision",
        choices=["no", "bf16"],
        default="no",
        help="bf16 autocast for the drafter's forward (fast on CPUs with avx512_bf16 and on GPUs)",
    )
    p.add_argument(
        "--feature-dir",
        default=None,
        help="cache of the target's hidden-state features (default: <DLLM_SPEC_CACHE>/features)",
    )
    p.add_argument(
        "--resident-features",
        action="store_true",
        help="block diffusion: compute the target features once into (GPU) memory instead of the disk cache (~6 KB per token)",
    )
    defaults = CONFIGS[drafter]()
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    return p


def main(argv: list[str] | None = None) -> None:
    from dllm_spec.cli_errors import exits_cleanly

    with exits_cleanly("dllm-spec train", (ValueError, OSError)):
        _main(argv)


def _main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--drafter", choices=sorted(CONFIGS), default="block-diffusion")
    drafter = pre.parse_known_args(argv)[0].drafter
    args = build_parser(drafter).parse_args(argv)
    for flag, dirs in (("--data", args.data), ("--eval-data", args.eval_data or [])):
        for d in dirs:
            if not Path(d).is_dir():
                raise FileNotFoundError(f"{flag} {d}: no such directory")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from dllm_spec.target import load_target
    from dllm_spec.training.loop import check_resume
    from dllm_spec.training.sequences import load_sequences

    budget = None if args.time_budget_min is None else 60 * args.time_budget_min
    config_cls = CONFIGS[drafter]
    cfg = config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})
    check_resume(args.out, drafter, cfg)  # before any work: a mismatched resume, unreadable or unusable data
    sequences = load_sequences(args.data, cfg.max_len, cfg.heldout_mod, args.eval_data)
    if torch.cuda.is_available():
        # TF32 for the target's fp32 feature passes (the resident fill's cost): its error is far
        # below the bf16 noise the drafter already tolerates, and training needs no exact features.
        torch.backends.cuda.matmul.allow_tf32 = True
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    target, tokenizer = load_target(args.target, dtype=args.dtype, device=accelerator.device)
    if drafter != "block-diffusion":
        best = train_token_drafter(
            OBJECTIVES[drafter](),
            target,
            tokenizer,
            args.data,
            args.out,
            cfg,
            accelerator=accelerator,
            time_budget_s=budget,
            sequences=sequences,
        )
    else:
        best = train_block_diffusion(
            target,
            args.data,
            args.out,
            cfg,
            eos_token_id=tokenizer.eos_token_id,
            accelerator=accelerator,
            time_budget_s=budget,
            feature_root=args.feature_dir,
            resident_features=args.resident_features,
            sequences=sequences,
        )
    if accelerator.is_main_process:
        print(f"best drafter: {best}")


if __name__ == "__main__":
    main()
