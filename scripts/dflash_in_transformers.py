"""A DFlash-layout drafter in transformers' own ``generate`` against the same drafter in this
library's loop, side by side on the held-out prompts (greedy, fp32).

For each prompt: transformers' plain greedy ``generate`` (the reference), transformers'
``generate(assistant_model=..., speculation_type="dflash")`` with the drafter exported to the
``MuseGlimmerAssistantModel`` layout, and this library's engine drafting chains of block - 1 tokens
with the same drafter (``FixedLength``, no tree, no prompt lookup: what transformers does). Reports
tau (decoding-phase tokens per target forward) and whether each output equals the reference.

    python scripts/dflash_in_transformers.py DRAFTER_DIR --out benchmarks/dflash_transformers.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dllm_spec import DiffusionSpeculator
from dllm_spec.bench.runner import default_prompts
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.jsonl import write_atomic
from dllm_spec.policy import FixedLength
from dllm_spec.target import load_target


class ForwardCounter:
    """Counts the target's forward calls (a hook; nothing about the forward changes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(lambda *_: self._tick())

    def _tick(self) -> None:
        self.calls += 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("drafter", help="a dflash-architecture drafter directory (ours or a DFlash layout)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel

    target, tokenizer = load_target(None, dtype="float32")
    drafter = BlockDiffusionDrafter.from_pretrained(args.drafter)
    block = drafter.config.block_size
    spec = DiffusionSpeculator(target, tokenizer, drafter, policy=FixedLength(block - 1))
    with tempfile.TemporaryDirectory() as tmp:
        drafter.export(Path(tmp) / "tf", "transformers")
        assistant = AutoModel.from_pretrained(Path(tmp) / "tf", dtype=torch.float32).eval()
    counter = ForwardCounter(target)
    rows = []
    for prompt in tqdm(default_prompts(args.per_category), desc="prompts"):
        ids = spec.encode(prompt.text)
        n = ids.shape[1]
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        ref = target.generate(ids, **kwargs)[0, n:].tolist()
        counter.calls = 0
        theirs = target.generate(ids, assistant_model=assistant, speculation_type="dflash", **kwargs)[0, n:].tolist()
        forwards = counter.calls  # the prefill (one token) + one per verification
        ours = spec.generate(ids, max_new_tokens=args.max_new_tokens)
        rows.append(
            dict(
                id=prompt.id,
                category=prompt.category,
                new_tokens=len(ref),
                transformers_forwards=forwards,
                ours_forwards=ours.stats.target_forwards,
                transformers_tau=(len(theirs) - 1) / max(1, forwards - 1),
                ours_tau=ours.stats.tau,
                transformers_identical=theirs == ref,
                ours_identical=ours.token_ids[0].tolist() == ref,
            )
        )
        tqdm.write(
            f"{prompt.id}: transformers tau {rows[-1]['transformers_tau']:.2f}, ours {rows[-1]['ours_tau']:.2f}, "
            f"identical {rows[-1]['transformers_identical']}/{rows[-1]['ours_identical']}"
        )
    tokens = sum(r["new_tokens"] for r in rows)
    # decoding-phase tau over all prompts: transformers' prefill forward makes the first token itself
    summary = dict(
        prompts=len(rows),
        new_tokens=tokens,
        transformers_tau=(tokens - len(rows)) / sum(r["transformers_forwards"] - 1 for r in rows),
        ours_tau=tokens / sum(r["ours_forwards"] for r in rows),
        transformers_identical=sum(r["transformers_identical"] for r in rows),
        ours_identical=sum(r["ours_identical"] for r in rows),
    )
    summary["ratio"] = summary["transformers_tau"] / summary["ours_tau"]
    print(json.dumps(summary, indent=1))
    if args.out:
        write_atomic(
            Path(args.out),
            json.dumps(
                dict(
                    config=dict(
                        drafter=str(args.drafter),
                        block_size=block,
                        dtype="float32",
                        threads=torch.get_num_threads(),
                        max_new_tokens=args.max_new_tokens,
                    ),
                    summary=summary,
                    rows=rows,
                ),
                indent=1,
            ),
        )


if __name__ == "__main__":
    main()
