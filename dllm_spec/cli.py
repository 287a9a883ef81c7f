"""Command line: ``dllm-spec generate`` and ``dllm-spec bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CPUs with native bf16, else fp32), float32, bfloat16")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16, help="longest draft per cycle")
    p.add_argument("--policy", default="adaptive", help="adaptive[:MAX] | fixed:K | threshold[:THETA] | moving-average | heuristic")
    p.add_argument("--verification", choices=["token", "block"], default="token")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _load(args, drafter: str | None):
    import torch

    from dllm_spec import DiffusionSpeculator, SpeculatorConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    from dllm_spec.policy import build_policy

    config = SpeculatorConfig(block_size=args.block_size, verification=args.verification)
    return DiffusionSpeculator.from_pretrained(args.target, drafter=drafter, dtype=args.dtype, device=args.device, config=config,
                                               policy=build_policy(args.policy, args.block_size))


def cmd_generate(args) -> None:
    from transformers import TextStreamer

    drafter = "none" if args.baseline else args.drafter
    spec = _load(args, drafter)
    streamer = TextStreamer(spec.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = spec.generate(
        args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, streamer=streamer, chat=not args.no_chat, system=args.system,
    )
    s = out.stats
    print(f"\n[dllm-spec] {s.new_tokens} tokens | tau {s.tau:.2f} | {s.tokens_per_s:.1f} tokens/s | "
          f"drafter {s.drafter} | stop {s.stop_reason}", file=sys.stderr)


def cmd_bench(args) -> None:
    from dllm_spec.bench import default_prompts, format_table, load_prompt_file, run_bench

    spec = _load(args, "none")
    prompts = load_prompt_file(args.prompts) if args.prompts else default_prompts(args.per_category)
    result = run_bench(spec, [d.strip() for d in args.drafters.split(",") if d.strip()], prompts,
                       max_new_tokens=args.max_new_tokens, repeats=args.repeats, block_size=args.block_size,
                       temperature=args.temperature, default_policy=args.policy)
    table = format_table(result["summary"])
    print(table)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            json.dump(result, fh, indent=1)
        os.replace(fh.name, path)
        print(f"results written to {path}", file=sys.stderr)


def cmd_train(args) -> None:
    from dllm_spec.training.cli import main as train_main

    train_main(args.rest)


def cmd_study(args) -> None:
    from dllm_spec.study import main as study_main

    study_main(args.rest)


def cmd_traces(args) -> None:
    from dllm_spec.traces import main as traces_main

    traces_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-spec", description="Lossless speculative decoding with diffusion and classic drafters.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate with live streaming, then print tokens, tau and tokens/s")
    g.add_argument("prompt")
    _common(g)
    g.add_argument("--drafter", default=None, help="none | prompt-lookup | early-exit[:N] | ar:<path> (default: the library default)")
    g.add_argument("--baseline", action="store_true", help="plain autoregressive decoding of the same model")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--system", default=None)
    g.add_argument("--no-chat", action="store_true", help="send the raw text, without the chat template")
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("bench", help="plain AR vs each drafter, side by side in one run")
    _common(b)
    b.add_argument("--drafters", default="prompt-lookup,early-exit:24",
                   help="comma-separated drafter or drafter@policy, e.g. prompt-lookup@fixed:8,prompt-lookup@adaptive")
    b.add_argument("--prompts", default=None, help="text (one per line) or JSONL; default: the project's held-out prompts")
    b.add_argument("--per-category", type=int, default=2)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--out", default=None, help="JSON results path")
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("traces", help="generate reasoning traces from a prompt file (resumable; see dllm_spec.traces --help)",
                       add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_traces)
    tr = sub.add_parser("train", help="train a block-diffusion drafter (see dllm-spec train --help)", add_help=False)
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(func=cmd_train)
    st = sub.add_parser("study", help="speedup study on long outputs (see dllm-spec study --help)", add_help=False)
    st.add_argument("rest", nargs=argparse.REMAINDER)
    st.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dllm-spec: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
