"""Held-out offline tau of several block-diffusion drafters on the same greedy sequences (the
trainer's measure: one denoising step, full block), each with its draft vocabulary and with the
target's full vocabulary (what transformers' and z-lab's DFlash apply).

    python scripts/compare_offline_tau.py NAME=DIR [NAME=DIR ...] --data DIR --features DIR --out benchmarks/x.json

Builds the feature cache for the held-out sequences when it is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.jsonl import write_atomic
from dllm_spec.target import load_target
from dllm_spec.training.block_diffusion import TrainConfig
from dllm_spec.training.block_examples import offline_tau
from dllm_spec.training.features import FeatureStore, build_stores, feature_dir
from dllm_spec.training.sequences import load_sequences, shard_rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("drafters", nargs="+", help="NAME=DIR")
    p.add_argument("--data", required=True)
    p.add_argument("--features", required=True, help="feature cache root")
    p.add_argument("--sequences", type=int, default=80, help="held-out greedy sequences")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, _ = load_target(None, dtype="float32")
    cfg = TrainConfig(eval_sequences=args.sequences)
    train, held = load_sequences(args.data, cfg.max_len, cfg.heldout_mod)
    results = {}
    for item in args.drafters:
        name, _, path = item.partition("=")
        model = BlockDiffusionDrafter.from_pretrained(path).model.float().eval()
        layers = list(model.config.target_layer_ids)
        store = FeatureStore(feature_dir(args.features, target, layers), target, layers)
        build_stores([store], shard_rows(train + held))
        full = torch.arange(target.get_output_embeddings().weight.shape[0])
        head = target.get_output_embeddings().weight.detach()
        row = {"architecture": model.config.architecture}
        for label, vocab in (
            ("draft_vocab", model.draft_vocab if model.draft_vocab.numel() else full),
            ("full_vocab", full),
        ):
            row[label] = offline_tau(model, target, held, cfg, head[vocab], vocab, store)
        results[name] = row
        print(name, json.dumps(row))
    if args.out:
        write_atomic(
            Path(args.out),
            json.dumps(
                dict(
                    config=dict(
                        data=args.data,
                        sequences=min(args.sequences, sum(s.greedy for s in held)),
                        threads=torch.get_num_threads(),
                        dtype="float32",
                    ),
                    results=results,
                ),
                indent=1,
            ),
        )


if __name__ == "__main__":
    main()
