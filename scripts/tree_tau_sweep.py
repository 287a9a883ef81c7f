"""Tau of block-diffusion draft trees against tree size and width, at any temperature, without
verification forwards.

On held-out prompts the target's response is computed once: greedy at T = 0; at T > 0 the
reproducible (keyed) sample of a recorded seed, which is exactly what the speculative loop commits
whatever it drafts. The drafter is then run at exactly the anchors the real loop would visit (after
each cycle's accepted drafts and bonus token) on the target's teacher-forced features, and at T > 0
proposes its guesses under the same keyed noise as in the loop. The accepted length of a tree is
the depth reached by walking it along the response: in reproducible sampling a draft token is
accepted exactly when it equals the keyed sample at its position given the accepted prefix. Chains
(width 1) reproduce the online benchmark's tau.

    python scripts/tree_tau_sweep.py --widths 1,2,4,8 --nodes 4,8,16,24,32,48 --out benchmarks/tree_tau_sweep.json
    python scripts/tree_tau_sweep.py --prompts sharegpt-heldout --limit 16 --temperatures 0,0.7 \
        --widths 1,4 --nodes 16,32 --out sweep.json

``--sharpness a,b,...`` multiplies the drafter's logits before it guesses (a drafter temperature of
T / a): whether a drafter sharper or flatter than its trained distribution guesses the target's
sample better.

Writes the JSON (atomically) and a plot next to it (tau against nodes, one line per width).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dllm_spec.bench.runner import default_prompts, load_prompt_file
from dllm_spec.drafters.base import Sequences
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.drafters.shipped import shipped_drafter_dir
from dllm_spec.jsonl import write_atomic
from dllm_spec.speculator import DiffusionSpeculator
from dllm_spec.verify.keyed import NoiseKeys
from dllm_spec.verify.sampling import SamplingParams
from dllm_spec.verify.tree import follow_choices, tree_depths


def accepted_depth(tokens: torch.Tensor, parents: torch.Tensor, truth: list[int]) -> int:
    """How deep a draft tree matches the true continuation ``truth``: the greedy walk with each
    row's choice the true token at its depth (-1, matching nothing, past the end of ``truth``)."""
    depth_after = [0] + (tree_depths(parents) + 1).tolist()  # row -> index of the token it predicts
    choice = [truth[d] if d < len(truth) else -1 for d in depth_after]
    return int(follow_choices(tokens, parents, choice).path.numel())


def target_response(spec, prompt_ids: torch.Tensor, layers, max_new_tokens: int, temperature: float, seed: int):
    """The target's response (prompt + new tokens, (1, T)) and its teacher-forced features (1, T, F)."""
    out = spec.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    full = torch.cat([prompt_ids, out.token_ids.reshape(1, -1)], dim=1)
    with torch.inference_mode():
        hidden = spec.target(full, output_hidden_states=True).hidden_states
    return full, torch.cat([hidden[i] for i in layers], dim=-1)


def count_cycles(
    drafter, full: torch.Tensor, features: torch.Tensor, start: int, nodes: int, sampling, seed: int
) -> int:
    """Cycles the loop would take from ``start`` to the end of ``full`` with this drafter and tree size."""
    end, truth = full.shape[1], full[0].tolist()
    depth_cap = drafter.config.block_size - 1
    pos, cycles = start, 0
    drafter.reorder([])
    drafter.begin([0], Sequences.from_tensor(full[:, :pos]), features[:, : pos - 1], [pos - 1])
    while pos < end:
        seqs = Sequences.from_tensor(full[:, :pos])
        if sampling.keyed:
            seqs.keys = NoiseKeys(torch.tensor([seed]), torch.tensor([pos]))
        row = drafter.propose(seqs, nodes, sampling, [None]).row(0)
        new_pos = pos + accepted_depth(row.tokens[0], row.row_parents(0), truth[pos : min(end, pos + depth_cap)]) + 1
        # what the loop hands over: features of the previous last token and the accepted drafts
        drafter.commit(Sequences.from_tensor(full[:, :new_pos]), features[:, pos - 1 : new_pos - 1], [new_pos - pos])
        pos, cycles = new_pos, cycles + 1
    return cycles


def sharpened(drafter: BlockDiffusionDrafter, factor: float) -> BlockDiffusionDrafter:
    """The drafter with its logits multiplied by ``factor`` (1 leaves it as trained)."""
    if factor != 1.0:
        logits = drafter._logits
        drafter._logits = lambda hidden: logits(hidden) * factor
    return drafter


def sweep(args, spec, prompts, drafters, temperature: float) -> dict[tuple, dict[str, list[int]]]:
    """(sharpness, width, nodes) -> category -> [new tokens, cycles] at one temperature."""
    sampling = SamplingParams(temperature=temperature)
    first = next(iter(drafters.values()))
    depth_cap = first.config.block_size - 1
    totals: dict[tuple, dict[str, list[int]]] = {}
    for i, prompt in enumerate(tqdm(prompts, desc=f"T={temperature:g}")):
        ids, seed = spec.encode(prompt.generate_input), args.seed + i
        full, features = target_response(spec, ids, first.target_layer_ids, args.max_new_tokens, temperature, seed)
        for (a, w), drafter in drafters.items():
            for n in args.sizes if w > 1 else sorted({min(n, depth_cap) for n in args.sizes}):
                cycles = count_cycles(drafter, full, features, ids.shape[1], n, sampling, seed)
                row = totals.setdefault((a, w, n), {}).setdefault(prompt.category, [0, 0])
                row[0] += full.shape[1] - ids.shape[1]
                row[1] += cycles
    return totals


def results_of(totals: dict[tuple, dict[str, list[int]]], temperature: float) -> list[dict]:
    results = []
    for (a, w, n), cats in totals.items():
        new, cyc = sum(v[0] for v in cats.values()), sum(v[1] for v in cats.values())
        by_category = {c: v[0] / v[1] for c, v in cats.items()}
        row = dict(temperature=temperature, sharpness=a, width=w, nodes=n, tau=new / cyc)
        results.append(dict(row, by_category=by_category))
    return results


def plot(out_path: Path, results: list[dict], title: str) -> None:
    """tau against nodes, one line per (temperature, width, sharpness)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, a, w in sorted({(r["temperature"], r["sharpness"], r["width"]) for r in results}):
        pts = sorted(
            (r["nodes"], r["tau"]) for r in results if (r["temperature"], r["sharpness"], r["width"]) == (t, a, w)
        )
        label = ("chain" if w == 1 else f"tree, width {w}") + f", T = {t:g}" + (f", sharpness {a:g}" if a != 1 else "")
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set_xlabel("draft tokens verified per cycle (tree nodes)")
    ax.set_ylabel("tau")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path.with_suffix(".png"), dpi=120)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="1,2,4,8", help="candidates per position (1 = chain)")
    p.add_argument("--nodes", default="4,8,16,24,32,48", help="tree sizes (nodes verified per cycle)")
    p.add_argument("--prompts", default=None, help="a prompt file or an evaluation set (default: the held-out split)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of --prompts")
    p.add_argument("--per-category", type=int, default=2, help="held-out prompts per category (no --prompts)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperatures", default="0", help="0: greedy; > 0: reproducible (keyed) sampling")
    p.add_argument("--seed", type=int, default=1000, help="prompt i's sample uses seed + i")
    p.add_argument("--sharpness", default="1", help="factors on the drafter's logits (1 = as trained)")
    p.add_argument("--drafter", default=None, help="block-diffusion checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps S (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/tree_tau_sweep.json")
    args = p.parse_args(argv)
    args.width_list = [int(w) for w in args.widths.split(",")]
    args.sizes = [int(n) for n in args.nodes.split(",")]
    args.factors = [float(a) for a in args.sharpness.split(",")]
    args.temperature_list = [float(t) for t in args.temperatures.split(",")]
    if any(w < 1 for w in args.width_list) or any(n < 1 for n in args.sizes) or any(a <= 0 for a in args.factors):
        p.error("widths, node counts and sharpness factors must be positive")
    if any(t < 0 for t in args.temperature_list):
        p.error("temperatures must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = DiffusionSpeculator.from_pretrained(drafter="none", dtype="float32")
    path = args.drafter or shipped_drafter_dir()
    drafters = {}
    for a in args.factors:
        for w in args.width_list:
            d = BlockDiffusionDrafter.from_pretrained(path, num_inference_steps=args.steps, tree_width=w, min_block=16)
            d.bind(spec.target, spec.tokenizer)
            drafters[(a, w)] = sharpened(d, a)
    prompts = load_prompt_file(args.prompts, args.limit) if args.prompts else default_prompts(args.per_category)
    results = [r for t in args.temperature_list for r in results_of(sweep(args, spec, prompts, drafters, t), t)]
    steps = next(iter(drafters.values())).steps
    out_path = Path(args.out)
    config = dict(prompts=args.prompts or "heldout", n_prompts=len(prompts), max_new_tokens=args.max_new_tokens)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, json.dumps(dict(config, seed=args.seed, steps=steps, results=results), indent=1))
    plot(out_path, results, f"Block-diffusion drafter, S = {steps}, {len(prompts)} prompts")
    for r in sorted(results, key=lambda r: (r["temperature"], r["sharpness"], r["width"], r["nodes"])):
        setting = f"T {r['temperature']:g} sharpness {r['sharpness']:g} width {r['width']:>2} nodes {r['nodes']:>3}"
        print(f"{setting}: tau {r['tau']:.2f}")


if __name__ == "__main__":
    main()
