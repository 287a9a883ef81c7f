"""The baseline for ``dllm-spec traces --num-samples N``: what a user would write instead, a plain
transformers script doing batched sampled ``generate`` with ``num_return_sequences=N`` on a stock
model (no kernels of this library), writing one JSONL record per sample.

Both sides are timed as whole processes (load included) over the same prompt file::

    python scripts/transformers_traces.py --write-prompts /tmp/p.jsonl --prompts sharegpt-heldout --limit 32
    /usr/bin/time -v python scripts/transformers_traces.py /tmp/p.jsonl --out /tmp/hf.jsonl \\
        --num-samples 8 --max-new-tokens 512 --temperature 0.7
    /usr/bin/time -v dllm-spec traces /tmp/p.jsonl --out /tmp/ours.jsonl \\
        --num-samples 8 --max-new-tokens 512 --temperature 0.7

Each prints ``new_tokens=<n>`` (tokens up to and including the stop token) on its last line here;
for ``traces``, count them from its output (``--count FILE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _write_prompts(path: str, name: str, limit: int) -> None:
    from dllm_spec.data.eval_sets import external_prompts

    with open(path, "w") as fh:
        for p in external_prompts(name, limit):
            fh.write(json.dumps({"id": p.id, "prompt": p.text}) + "\n")


def _count(path: str) -> int:
    """New tokens in a traces output file (its records' ``token_count``)."""
    with open(path) as fh:
        return sum(json.loads(line)["token_count"] for line in fh if line.strip())


def _default_model() -> str:
    from dllm_spec.target import _converted_default_dir, load_target

    load_target(kernels="default")  # converts the embedded GGUF once (a no-op when cached)
    return str(_converted_default_dir())


def _generate(args) -> int:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    path = args.model or _default_model()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    prompts = [json.loads(line) for line in open(args.input) if line.strip()]
    total = 0
    with open(args.out, "w") as out:
        for b in range(0, len(prompts), args.prompts_per_batch):
            batch = prompts[b : b + args.prompts_per_batch]
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True
                )
                for p in batch
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                ids = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=args.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=args.max_new_tokens,
                    num_return_sequences=args.num_samples,
                    pad_token_id=tokenizer.eos_token_id,
                )
            new = ids[:, enc["input_ids"].shape[1] :]  # (prompts x samples, new)
            for row, tokens in enumerate(new.tolist()):
                stop = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else len(tokens)
                total += stop
                p = batch[row // args.num_samples]
                text = tokenizer.decode(tokens[:stop], skip_special_tokens=True)
                out.write(json.dumps({"id": p["id"], "sample": row % args.num_samples, "text": text}) + "\n")
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="JSONL with id and prompt (as dllm-spec traces reads)")
    parser.add_argument("--out", help="output JSONL")
    parser.add_argument("--model", default=None, help="a transformers checkpoint; default: the embedded target")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--prompts-per-batch", type=int, default=2, help="rows per generate call / num-samples")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--write-prompts", metavar="FILE", help="write --prompts (first --limit) as JSONL and exit")
    parser.add_argument("--prompts", default="sharegpt-heldout")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--count", metavar="FILE", help="print the new tokens of a dllm-spec traces output and exit")
    args = parser.parse_args(argv)
    if args.write_prompts:
        _write_prompts(args.write_prompts, args.prompts, args.limit)
    elif args.count:
        print(f"new_tokens={_count(args.count)}")
    elif not (args.input and args.out):
        sys.exit("transformers_traces.py: give an input prompt file and --out")
    elif Path(args.out).exists():
        sys.exit(f"transformers_traces.py: --out {args.out} exists")
    else:
        print(f"new_tokens={_generate(args)}")


if __name__ == "__main__":
    main()
