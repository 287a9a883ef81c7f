"""Speculation at temperature > 0: tau and speed by temperature, sampling method and draft shape.

One process, every variant interleaved per prompt (the order rotates), on prompts nobody here
wrote. For each temperature: transformers' sampled ``generate`` on a separately loaded stock model
(same dtype, no kernels of ours: what a user compares against), our plain sampled decoding, and the
speculators (the default draft trees, and chains) under both sampling methods: ``reproducible``
(keyed Gumbel-max: a seed gives the same text whatever the speculation) and ``speculative``
(Leviathan / SpecInfer rejection sampling). T = 0 is the greedy reference tau. ``--no-timing``
measures tau only (it does not depend on the machine's load).

    python scripts/sampling_study.py --prompts sharegpt-heldout --limit 16 --max-new-tokens 256 \
        --temperatures 0,0.7 --threads 2 --out benchmarks/sampling.json  # more temperatures: rerun with
    # --temperatures 0.3,1.0 and the same --out (the finished ones are kept)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchmark_tables import sampling_rows  # scripts/benchmark_tables.py, beside this script
from tqdm.auto import tqdm

from dllm_spec import DiffusionSpeculator
from dllm_spec.bench.runner import build_variant, cpu_flags, default_prompts, load_prompt_file
from dllm_spec.jsonl import write_atomic
from dllm_spec.target import load_target

SHAPES = {"trees": "default", "chains": "prompt-lookup+block-diffusion"}


def _variants(spec: DiffusionSpeculator, temperature: float) -> dict[str, tuple[DiffusionSpeculator, dict]]:
    """label -> (speculator, generate kwargs) for one temperature."""
    out = {"plain": (build_variant("none", spec, "adaptive", 16), {})}
    methods = ["reproducible"] if temperature == 0 else ["reproducible", "speculative"]
    for shape, drafter in SHAPES.items():
        runner = spec if drafter == "default" else build_variant(drafter, spec, "adaptive", 16)
        for method in methods:
            out[f"{shape}/{method}" if temperature else shape] = (runner, {"sampling": method})
    return out


def _hf_run(model, tokenizer, ids: torch.Tensor, temperature: float, max_new_tokens: int, seed: int) -> dict:
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, **kwargs)
    return dict(new_tokens=int(out.shape[1] - ids.shape[1]), wall_time_s=time.perf_counter() - start, tau=1.0)


def _config(args, spec: DiffusionSpeculator, n_prompts: int) -> dict:
    return dict(
        dtype=str(spec.target.dtype),
        threads=torch.get_num_threads(),
        prompts=args.prompts or "heldout",
        limit=n_prompts,
        max_new_tokens=args.max_new_tokens,
        timing=not args.no_timing,
        cpu_flags=cpu_flags(),
        kernels=getattr(spec.target, "dllm_kernels", "default"),
    )


def _save(args, config: dict, records: list[dict]) -> dict:
    """The result so far; written atomically to --out after every temperature."""
    result = dict(config=config, summary=summarize(records), records=records)
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=1))
    return result


def _resumed(args, config: dict) -> list[dict]:
    """Records of a previous run of the same configuration in --out (its finished temperatures)."""
    if not args.out or not Path(args.out).exists():
        return []
    old = json.loads(Path(args.out).read_text())
    if old.get("config") != config:
        raise SystemExit(f"--out {args.out}: holds a run with another configuration; remove it or pick another path")
    return old["records"]


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = DiffusionSpeculator.from_pretrained(dtype=args.dtype)
    prompts = load_prompt_file(args.prompts, args.limit) if args.prompts else default_prompts(2)[: args.limit]
    hf, tokenizer = (None, None) if args.no_timing else load_target(dtype=spec.target.dtype, kernels="default")
    temperatures = [float(t) for t in args.temperatures.split(",")]
    config = _config(args, spec, len(prompts))
    records = _resumed(args, config)
    done = {r["temperature"] for r in records}
    spec.generate("Hello", max_new_tokens=8)  # warm-up (and the latency curve, measured once)
    for temperature in [t for t in temperatures if t not in done]:
        variants = _variants(spec, temperature)
        labels = list(variants) + ([] if hf is None else ["transformers"])
        for i, prompt in enumerate(tqdm(prompts, desc=f"T={temperature}")):
            order = labels[i % len(labels) :] + labels[: i % len(labels)]
            for label in order:
                if label == "transformers":
                    row = _hf_run(
                        hf, tokenizer, spec.encode(prompt.generate_input), temperature, args.max_new_tokens, i
                    )
                else:
                    runner, kwargs = variants[label]
                    s = runner.generate(
                        prompt.generate_input,
                        max_new_tokens=args.max_new_tokens,
                        temperature=temperature,
                        seed=1000 + i,
                        **kwargs,
                    ).stats
                    row = dict(new_tokens=s.new_tokens, wall_time_s=s.wall_time_s, tau=s.tau)
                records.append(
                    dict(temperature=temperature, variant=label, prompt_id=prompt.id, category=prompt.category, **row)
                )
        _save(args, config, records)
    return _save(args, config, records)


def summarize(records: list[dict]) -> dict:
    """Per (temperature, variant): tau (tokens per target forward over all prompts), tokens/s, and
    the speedup over transformers and over our plain decoding at that temperature."""
    out: dict = {}
    for t in sorted({r["temperature"] for r in records}):
        rows = [r for r in records if r["temperature"] == t]
        tps = {}
        for v in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == v]
            tokens = sum(r["new_tokens"] for r in mine)
            forwards = sum(r["new_tokens"] / r["tau"] for r in mine if r["tau"])
            tps[v] = tokens / max(sum(r["wall_time_s"] for r in mine), 1e-9)
            out.setdefault(str(t), {})[v] = dict(tau=tokens / max(forwards, 1e-9), tokens_per_s=tps[v])
        for v, row in out[str(t)].items():
            row["vs_plain"] = row["tokens_per_s"] / tps["plain"]
            if "transformers" in tps:
                row["vs_transformers"] = row["tokens_per_s"] / tps["transformers"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--prompts", default=None, help="a prompt file or an evaluation set (sharegpt-heldout, mt-bench, humaneval)"
    )
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperatures", default="0,0.3,0.7,1.0")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-timing", action="store_true", help="tau only: no transformers baseline")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(sampling_rows(run(args)))


if __name__ == "__main__":
    main()
