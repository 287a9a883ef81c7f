"""Greedy tau of block-diffusion draft trees against tree size and width, without verification
forwards: on the benchmark's held-out prompts, the target's greedy response is computed once, then
the drafter is run at exactly the anchors the real greedy loop would visit (after each cycle's
accepted drafts and bonus token) on the target's teacher-forced features, which in greedy decoding
are the features the loop would hand it. The accepted length of a tree is the depth reached by
walking it along the greedy response. Chains (width 1) reproduce the online benchmark's tau.

    python scripts/tree_tau_sweep.py --widths 1,2,4,8 --nodes 4,8,16,24,32,48 --out benchmarks/tree_tau_sweep.json

Writes the JSON (atomically) and a plot next to it (tau against nodes, one line per width).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dllm_spec.bench.runner import default_prompts
from dllm_spec.drafters.base import Sequences
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.drafters.shipped import shipped_drafter_dir
from dllm_spec.speculator import DiffusionSpeculator
from dllm_spec.verify.sampling import SamplingParams
from dllm_spec.verify.tree import follow_choices, tree_depths


def accepted_depth(tokens: torch.Tensor, parents: torch.Tensor, truth: list[int]) -> int:
    """How deep a draft tree matches the true continuation ``truth``: the greedy walk with each
    row's choice the true token at its depth (-1, matching nothing, past the end of ``truth``)."""
    depth_after = [0] + (tree_depths(parents) + 1).tolist()  # row -> index of the token it predicts
    choice = [truth[d] if d < len(truth) else -1 for d in depth_after]
    return int(follow_choices(tokens, parents, choice).path.numel())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="1,2,4,8", help="candidates per position (1 = chain)")
    p.add_argument("--nodes", default="4,8,16,24,32,48", help="tree sizes (nodes verified per cycle)")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--drafter", default=None, help="block-diffusion checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps S (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/tree_tau_sweep.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    sizes = [int(n) for n in args.nodes.split(",")]
    if any(w < 1 for w in widths) or any(n < 1 for n in sizes):
        raise ValueError("widths and node counts must be positive")

    spec = DiffusionSpeculator.from_pretrained(drafter="none", dtype="float32")
    target = spec.target
    drafters = {
        w: BlockDiffusionDrafter.from_pretrained(
            args.drafter or shipped_drafter_dir(), num_inference_steps=args.steps, tree_width=w, min_block=16
        )
        for w in widths
    }
    for d in drafters.values():
        d.bind(target, spec.tokenizer)
    layers = drafters[widths[0]].target_layer_ids
    depth_cap = drafters[widths[0]].config.block_size - 1

    totals: dict[str, dict[str, list[int]]] = {}  # "w/n" -> category -> [new tokens, cycles]
    prompts = default_prompts(args.per_category)
    for prompt in tqdm(prompts, desc="prompts"):
        ids = spec.encode(prompt.text)
        with torch.inference_mode():
            full = target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            out = target(full, output_hidden_states=True)
        features = torch.cat([out.hidden_states[i] for i in layers], dim=-1)  # (1, T, F)
        start, end = ids.shape[1], full.shape[1]
        truth_all = full[0].tolist()
        for w, drafter in drafters.items():
            for n in sizes if w > 1 else sorted({min(n, depth_cap) for n in sizes}):
                pos, cycles = start, 0
                drafter.reorder([])
                drafter.begin([0], Sequences.from_tensor(full[:, :pos]), features[:, : pos - 1], [pos - 1])
                while pos < end:
                    proposal = drafter.propose(Sequences.from_tensor(full[:, :pos]), n, SamplingParams(), [None])
                    row = proposal.row(0)
                    parents = row.row_parents(0)
                    new_pos = (
                        pos + accepted_depth(row.tokens[0], parents, truth_all[pos : min(end, pos + depth_cap)]) + 1
                    )
                    # what the loop hands over: features of the previous last token and the accepted drafts
                    drafter.commit(
                        Sequences.from_tensor(full[:, :new_pos]), features[:, pos - 1 : new_pos - 1], [new_pos - pos]
                    )
                    pos, cycles = new_pos, cycles + 1
                row = totals.setdefault(f"{w}/{n}", {}).setdefault(prompt.category, [0, 0])
                row[0] += end - start
                row[1] += cycles

    results = []
    for key, cats in totals.items():
        w, n = (int(x) for x in key.split("/"))
        new = sum(v[0] for v in cats.values())
        cyc = sum(v[1] for v in cats.values())
        results.append(
            {"width": w, "nodes": n, "tau": new / cyc, "by_category": {c: v[0] / v[1] for c, v in cats.items()}}
        )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "prompts": len(prompts),
                "max_new_tokens": args.max_new_tokens,
                "steps": drafters[widths[0]].steps,
                "results": results,
            },
            indent=1,
        )
    )
    os.replace(tmp, out_path)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for w in widths:
        pts = sorted((r["nodes"], r["tau"]) for r in results if r["width"] == w)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label="chain" if w == 1 else f"tree, width {w}")
    ax.set_xlabel("draft tokens verified per cycle (tree nodes)")
    ax.set_ylabel("greedy tau")
    ax.set_title(f"Block-diffusion drafter, S = {drafters[widths[0]].steps}, {len(prompts)} held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path.with_suffix(".png"), dpi=120)
    for r in sorted(results, key=lambda r: (r["width"], r["nodes"])):
        print(f"width {r['width']:>2} nodes {r['nodes']:>3}: tau {r['tau']:.2f}")


if __name__ == "__main__":
    main()
