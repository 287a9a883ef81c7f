"""Generate self-distillation data for drafter training (resumable): see dllm_spec.data.distill."""

from __future__ import annotations

import argparse

import torch

from dllm_spec.data.distill import DistillConfig, generate_distillation_data
from dllm_spec.data.prompts import training_prompts
from dllm_spec.target import load_target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/distill")
    parser.add_argument("--target", default=None, help="HF id or path; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="64 with the static cache: ~185 new tokens/s on 2 CPU cores")
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--shard-size", type=int, default=128, help="responses per shard (the unit lost if killed)")
    parser.add_argument("--max-shards", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--temperatures", default="0.0,0.8",
                        help="comma-separated, one response per prompt each (0 = greedy); append new ones to grow a data set")
    parser.add_argument("--compile", action="store_true", help="let HF's generate compile the forward (GPU, static cache)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, dtype=args.dtype)
    prompts = training_prompts()
    temperatures = tuple(float(t) for t in args.temperatures.split(","))
    config = DistillConfig(temperatures=temperatures, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           shard_size=args.shard_size, compile=args.compile)
    generate_distillation_data(model, tokenizer, prompts, args.out, config, max_shards=args.max_shards)


if __name__ == "__main__":
    main()
