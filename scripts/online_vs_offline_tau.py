"""Online tau (the real speculative loop) against the trainer's offline tau, on the SAME held-out
greedy sequences of the distillation data: tells a training-signal gap from a drafting bug.

    python scripts/online_vs_offline_tau.py 8 [--data data/distill] [--drafter drafters/assets/block-diffusion-smollm2-135m]

Needs the feature cache the trainer built for these sequences (``dllm-spec train`` builds it).
"""

from __future__ import annotations

import argparse

import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter, BlockDiffusionModel
from dllm_spec.drafters.shipped import shipped_drafter_dir
from dllm_spec.policy import FixedLength
from dllm_spec.target import cache_root, load_target
from dllm_spec.training.block_diffusion import TrainConfig
from dllm_spec.training.block_examples import offline_tau
from dllm_spec.training.features import FeatureStore, feature_dir
from dllm_spec.training.sequences import load_sequences


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sequences", type=int, nargs="?", default=8, help="how many held-out greedy sequences")
    p.add_argument("--data", default="data/distill")
    p.add_argument(
        "--drafter", default=None, help="a block-diffusion drafter checkpoint directory (default: the shipped one)"
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, tokenizer = load_target(None, dtype="float32")
    cfg = TrainConfig(eval_sequences=args.sequences)
    _, held = load_sequences(args.data, cfg.max_len, cfg.heldout_mod)
    seqs = [s for s in held if s.greedy][: args.sequences]
    model = BlockDiffusionModel.from_pretrained(args.drafter or shipped_drafter_dir()).float().eval()
    layers = list(model.config.target_layer_ids)
    store = FeatureStore(feature_dir(cache_root() / "features", target, layers), target, layers)
    head = target.get_output_embeddings().weight[model.draft_vocab].detach()
    offline = offline_tau(model, target, seqs, cfg, head, model.draft_vocab, store)
    # the full block, one denoising step: what the offline measure scores
    spec = DiffusionSpeculator(
        target, tokenizer, BlockDiffusionDrafter(model), policy=FixedLength(model.config.block_size - 1)
    )
    committed = forwards = identical = 0
    for s in seqs:
        ref = s.ids[s.prompt_len :]
        out = spec.generate(torch.tensor([s.ids[: s.prompt_len]]), max_new_tokens=len(ref))
        got = out.token_ids[0].tolist()
        identical += got == ref[: len(got)]
        committed += len(got)
        forwards += out.stats.target_forwards
        print(f"{s.shard} row {s.row}: {len(got)} tokens, online tau {out.stats.tau:.2f}", flush=True)
    print(
        f"offline tau {offline:.3f}  online tau {committed / forwards:.3f}  "
        f"identical to the stored greedy response {identical}/{len(seqs)}"
    )


if __name__ == "__main__":
    main()
