"""Command line of the drafter-training pipeline (``dllm-spec train`` / ``scripts/train_drafter.py``)."""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dllm-spec train", description="Train a block-diffusion drafter on self-distillation data.")
    p.add_argument("--data", required=True, help="directory of distillation shards (scripts/generate_distill_data.py)")
    p.add_argument("--out", required=True, help="run directory: checkpoint/ (resume), best/ (the drafter), train_log.jsonl")
    p.add_argument("--target", default=None, help="HF id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--time-budget-min", type=float, default=None, help="stop (after a checkpoint) when this many minutes have passed")
    p.add_argument("--threads", type=int, default=None)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from dllm_spec.target import load_target

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    target, tokenizer = load_target(args.target, dtype=args.dtype, device=accelerator.device)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    best = train_block_diffusion(target, args.data, args.out, cfg, eos_token_id=tokenizer.eos_token_id, accelerator=accelerator,
                                 time_budget_s=None if args.time_budget_min is None else 60 * args.time_budget_min)
    if accelerator.is_main_process:
        print(f"best drafter: {best}")


if __name__ == "__main__":
    main()
