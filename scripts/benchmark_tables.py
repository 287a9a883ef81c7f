"""Write the result tables of README.md and BENCHMARKS.md from the result files in benchmarks/.

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in a document; this script
rewrites what is between them (atomically), so the documents always show what the files hold:

    python scripts/benchmark_tables.py            # rewrite README.md and BENCHMARKS.md in place
    python scripts/benchmark_tables.py --check    # exit 1 if a document is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str) -> dict | None:
    path = BENCH / name
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(config: dict) -> str:
    return (
        f"{config.get('dtype', '?').replace('torch.', '')}, {config.get('threads', '?')} threads, "
        f"kernels {config.get('kernels', '?')} (transformers: {config.get('hf_kernels', 'default')}), "
        f"{config.get('cpu_flags', 'CPU flags not recorded')}"
    )


def throughput_table(files: list[str], variants: tuple[str, ...] = ("transformers", "plain", "default")) -> str:
    rows = [
        "| batch | prompts | transformers tokens/s | plain tokens/s (vs transformers) | default tokens/s (vs transformers, vs plain) | default tau | rows identical to transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    configs = []
    for name in files:
        result = _load(name)
        if result is None:
            continue
        configs.append(result["config"])
        prompts = result["config"]["prompts"]
        for batch, by in sorted(result["summary"].items(), key=lambda kv: int(kv[0])):
            hf, plain, spec = (by.get(v) for v in variants)
            if not (hf and plain and spec):
                continue
            same = min(plain["rows_identical_to_transformers"], spec["rows_identical_to_transformers"])
            rows.append(
                f"| {batch} | {prompts} | {hf['tokens_per_s']:.1f} | {plain['tokens_per_s']:.1f} ({plain['vs_transformers']:.2f}x) | "
                f"**{spec['tokens_per_s']:.1f}** (**{spec['vs_transformers']:.2f}x**, {spec['vs_plain']:.2f}x) | "
                f"{spec['tau']:.2f} | {same}/{prompts} |"
            )
    if not configs:
        return "(no results yet)"
    return f"{_machine(configs[0])}, {configs[0]['max_new_tokens']} new tokens, one run:\n\n" + "\n".join(rows)


def latency_table(files: list[tuple[str, str]]) -> str:
    points = ("2", "4", "8", "16", "32")
    rows = [
        "| dtype, kernels | rows | step(1) | " + " | ".join(f"verify({k})" for k in points) + " |",
        "|---|---|---|" + "---|" * len(points),
    ]
    for name, label in files:
        result = _load(name)
        if result is None:
            continue
        for r, t in result["seconds"].items():
            rows.append(
                f"| {label} | {r} | {1000 * t['1']:.1f} ms | "
                + " | ".join(f"{t[k] / t['1']:.2f}x" for k in points)
                + " |"
            )
    return "\n".join(rows)


def drafter_table(name: str) -> str:
    result = _load(name)
    if result is None:
        return "(no results yet)"
    cats = [c for c in next(iter(result["summary"].values())) if c != "all"]
    rows = [
        "| drafter@policy | tau (" + " / ".join(cats) + ") | tau | tokens/s | vs plain | outputs identical to plain |",
        "|---|---|---|---|---|---|",
    ]
    for variant, by in result["summary"].items():
        per = " / ".join(f"{by[c]['tau']:.2f}" for c in cats)
        a = by["all"]
        runs = [r for r in result["records"] if r["drafter"] == variant]
        same = sum(bool(r.get("identical_to_ar")) for r in runs)
        rows.append(
            f"| {variant} | {per} | {a['tau']:.2f} | {a['tokens_per_s']:.1f} | {a['speedup']:.2f}x | {same}/{len(runs)} |"
        )
    c = result["config"]
    head = f"{c['dtype'].replace('torch.', '')}, {c['threads']} threads, kernels {c.get('kernels', '?')}, {c['prompts']} prompts:\n\n"
    return head + "\n".join(rows)


def dflash_table(offline: str, online: str) -> str:
    """Held-out offline tau of the shipped drafters (draft / full vocabulary), and the DFlash-layout
    drafter inside transformers' generate against the same drafter in this library's loop."""
    off, on = _load(offline), _load(online)
    if off is None:
        return "(no results yet)"
    rows = [
        "| drafter | architecture | offline tau, draft vocabulary | offline tau, full vocabulary |",
        "|---|---|---|---|",
    ]
    for name, r in off["results"].items():
        rows.append(f"| {name} | {r['architecture']} | {r['draft_vocab']:.2f} | {r['full_vocab']:.2f} |")
    text = (
        f"{off['config']['sequences']} held-out greedy sequences, fp32, one denoising step, full block:\n\n"
        + "\n".join(rows)
    )
    if on is not None:
        s, c = on["summary"], on["config"]
        text += (
            f"\n\nIn transformers' `generate(speculation_type=\"dflash\")` and in this library's loop (chains of "
            f"{c['block_size'] - 1}, no prompt lookup), {s['prompts']} held-out prompts x {c['max_new_tokens']} new tokens, "
            f"fp32, {c['threads']} threads:\n\n| engine | tau | outputs identical to plain greedy |\n|---|---|---|\n"
            f"| transformers | {s['transformers_tau']:.2f} | {s['transformers_identical']}/{s['prompts']} |\n"
            f"| dllm-spec | {s['ours_tau']:.2f} | {s['ours_identical']}/{s['prompts']} |\n\n"
            f"transformers reaches {s['ratio']:.2f}x this library's tau with the same drafter."
        )
    return text


def training_table(name: str, every: int = 500) -> str:
    """A drafter's held-out and train offline tau against training steps and tokens (every
    ``every`` steps and the best checkpoint), from its run's evaluations."""
    result = _load(name)
    if result is None:
        return "(no results yet)"
    best = max(result["curve"], key=lambda r: r["heldout_tau"])
    points = [r for r in result["curve"] if r["step"] % every == 0 or r is best]
    step = [
        f"**{r['step']}** (shipped)" if r is best else f"{r['step']} (warm start)" if r["step"] == 0 else str(r["step"])
        for r in points
    ]
    cells = {
        "step": step,
        "tokens seen in the run": [f"{r['tokens'] / 1e6:.1f}M" for r in points],
        "held-out tau": [f"**{r['heldout_tau']:.2f}**" if r is best else f"{r['heldout_tau']:.2f}" for r in points],
        "train tau": [f"{r['train_tau']:.2f}" for r in points],
    }
    rows = [f"| {label} | " + " | ".join(values) + " |" for label, values in cells.items()]
    rows.insert(1, "|---|" + "---|" * len(points))
    e = result["eval"]
    head = (
        f"{e['steps']:,} steps, {e['train_tokens_seen'] / 1e6:.1f}M training tokens, {e['train_sequences']:,} training / "
        f"{e['heldout_sequences']:,} held-out sequences ({e['train_response_tokens'] / 1e6:.2f}M training response tokens), "
        f"held-out tau on the first {result['config']['eval_sequences']} held-out greedy sequences:\n\n"
    )
    return head + "\n".join(rows)


def kernel_choice_table(name: str) -> str:
    """kernels="auto"'s measurement (a kernel-choice cache file): stock against packed matmuls over
    one model's linears at each row count, and the rows the packed path was chosen from."""
    result = _load(name)
    if result is None:
        return "(no results yet)"
    stock, packed = result["timings"]["default"], result["timings"]["packed"]
    rows = sorted(stock, key=int)
    lines = [
        "| rows | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
        "| stock (MKL) | " + " | ".join(f"{1000 * stock[r]:.1f} ms" for r in rows) + " |",
        "| packed (oneDNN) | " + " | ".join(f"{1000 * packed[r]:.1f} ms" for r in rows) + " |",
    ]
    cpu, version, dtype, threads = result["key"][:4]
    head = (
        f"{dtype.replace('torch.', '')}, {threads} threads, torch {version}, {cpu}; "
        f"choice: {result['choice']} from {result['packed_from']} rows:\n\n"
    )
    return head + "\n".join(lines)


def peers_table(name: str) -> str:
    """Every variant of a throughput run with peers (``bench --batch-sizes ... --peers vllm``), by
    batch: tokens/s against transformers and our plain decoding, tau, outputs identical to plain."""
    result = _load(name)
    if result is None:
        return "(no results yet)"
    c = result["config"]
    rows = [
        "| batch | variant | tokens/s | vs transformers | vs our plain | tau | rows identical to plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, by in sorted(result["summary"].items(), key=lambda kv: int(kv[0])):
        for variant, r in by.items():
            tau = f"{r['tau']:.2f}" if r.get("tau") else ""
            rows.append(
                f"| {batch} | {variant} | {r['tokens_per_s']:.1f} | {r['vs_transformers']:.2f}x | {r['vs_plain']:.2f}x | "
                f"{tau} | {r['rows_identical_to_plain']}/{c['prompts']} |"
            )
    head = f"{_machine(c)}, {c['prompts']} prompts x {c['max_new_tokens']} new tokens, one run:\n\n"
    return head + "\n".join(rows)


def vllm_check_table(name: str) -> str:
    """``scripts/vllm_check.sh``'s result: vLLM's mean acceptance and speed by k against vLLM plain."""
    result = _load(name)
    if result is None:
        return "(no results yet)"
    c, speed, acc = result["config"], result["vllm_speed"], result["acceptance"]
    rows = [
        "| k (num_speculative_tokens) | vLLM mean acceptance length | batch 1 tokens/s (vs vLLM plain) | "
        f"{speed['0']['concurrent']} concurrent tokens/s (vs vLLM plain) | outputs equal to vLLM plain (batch 1, concurrent) |",
        "|---|---|---|---|---|",
    ]
    checks = result["checks"]
    for k, r in sorted(speed.items(), key=lambda kv: int(kv[0])):
        mal = acc[k]["vllm_mean_acceptance_length_batch_1"] if k != "0" else 1.0
        b1, conc = f"{r['tokens_per_s_batch_1']:.1f}", f"{r['tokens_per_s_concurrent']:.1f}"
        if k != "0":
            b1 += f" ({r['speedup_batch_1']:.2f}x)"
            conc += f" ({r['speedup_concurrent']:.2f}x)"
        same = [checks.get(f"vLLM dflash k={k} ({mode}) vs vLLM plain ({mode})") for mode in ("batch_1", "batch_all")]
        equal = ", ".join(f"{c['equal']}/{c['of']}" for c in same if c) if k != "0" else ""
        rows.append(f"| {'plain' if k == '0' else k} | {mal:.2f} | {b1} | {conc} | {equal} |")
    flags = " ".join(f for f in c["cpu_flags"] if f.startswith(("avx", "amx")))
    head = (
        f"vLLM {c['vllm']}, {c['dtype']}, {c['cpu']} ({flags}), {c['nproc']} cores, {c['prompts']} held-out prompts x "
        f"{c['max_new_tokens']} new tokens, greedy, eager, {_vllm_verdict(result)}:\n\n"
    )
    return head + "\n".join(rows)


def _vllm_verdict(result: dict) -> str:
    if not result["passed"]:
        return "FAILED"
    if result.get("token_checks", "strict").startswith("strict"):
        return "every output check passed (token for token)"
    return "structural checks passed; bf16 outputs compared, not required equal"


def vllm_split_table(name: str) -> str:
    """Where vLLM's batch-1 step goes (``vllm_check.py split``): ms per step by phase, plain and with
    the drafter, tokens per step, and the tokens per step at which the drafter would break even."""
    result = _load(name)
    split = (result or {}).get("time_split") or {}
    if not split:
        return "(no results yet)"
    phases = ["target_forward", "logits", "drafter", "sample_and_verify", "preprocess", "bookkeep", "other"]
    rows = [
        "| k | step ms | " + " | ".join(p.replace("_", " ") for p in phases) + " | tokens per step | "
        "break-even tokens per step | vs vLLM plain |",
        "|---|---|" + "---|" * len(phases) + "---|---|---|",
    ]
    for k, r in sorted(split["runs"].items(), key=lambda kv: int(kv[0])):
        by = r["ms_per_step_by_phase"]
        cells = " | ".join(f"{by[p]:.1f}" if p in by else "" for p in phases)
        even = f"{r['break_even_tokens_per_step']:.2f}" if k != "0" else ""
        gain = f"{r['speedup_vs_plain']:.2f}x" if k != "0" else "1.00x"
        rows.append(
            f"| {'plain' if k == '0' else k} | {r['ms_per_step']:.1f} | {cells} | {r['tokens_per_step']:.2f} | {even} | {gain} |"
        )
    return f"batch 1, {split['prompts']} prompts, ms per engine step (one target forward):\n\n" + "\n".join(rows)


def sampling_table(name: str) -> str:
    """tau and speed by temperature and variant (scripts/sampling_study.py's result file)."""
    result = _load(name)
    return "(no results yet)" if result is None else sampling_rows(result)


def sampling_rows(result: dict) -> str:
    """A sampling study's table: tau as a fraction of the same drafter shape's greedy tau, tokens/s
    against our plain decoding and transformers' generate."""
    c, summary = result["config"], result["summary"]
    rows = [
        "| T | variant | tau | tau / greedy tau | tokens/s | vs plain | vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    greedy = summary.get("0.0", {})
    for t, variants in summary.items():
        for v, r in variants.items():
            ref = greedy.get(v.split("/")[0], {}).get("tau")
            ratio = f"{r['tau'] / ref:.2f}" if ref and float(t) else ""
            vs_hf = f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else ""
            rows.append(
                f"| {t} | {v} | {r['tau']:.2f} | {ratio} | {r['tokens_per_s']:.1f} | {r['vs_plain']:.2f}x | {vs_hf} |"
            )
    head = (
        f"{c['dtype'].replace('torch.', '')}, {c['threads']} threads, kernels {c.get('kernels', '?')}, "
        f"{c.get('cpu_flags', 'CPU flags not recorded')}, "
        f"{c['limit']} {c['prompts']} prompts x {c['max_new_tokens']} new tokens, one run, variants interleaved:\n\n"
    )
    return head + "\n".join(rows)


def sweep_by_temperature_table(name: str) -> str:
    """Offline tau of draft chains and trees by temperature (scripts/tree_tau_sweep.py's result file):
    one row per temperature, one column per (width, nodes), and each temperature's tau as a fraction
    of the greedy one."""
    result = _load(name)
    if result is None:
        return "(no results yet)"
    runs = [r for r in result["results"] if r.get("sharpness", 1.0) == 1.0]
    shapes = sorted({(r["width"], r["nodes"]) for r in runs})
    tau = {(r["temperature"], r["width"], r["nodes"]): r["tau"] for r in runs}
    names = [("chain" if w == 1 else f"width {w}") + f", {n} nodes" for w, n in shapes]
    rows = ["| T | " + " | ".join(names) + " |", "|---|" + "---|" * len(shapes)]
    for t in sorted({r["temperature"] for r in runs}):
        cells = []
        for w, n in shapes:
            ratio = f" ({tau[(t, w, n)] / tau[(0.0, w, n)]:.2f}x)" if t and (0.0, w, n) in tau else ""
            cells.append(f"{tau[(t, w, n)]:.2f}{ratio}")
        rows.append(f"| {t:g} | " + " | ".join(cells) + " |")
    head = (
        f"{result['n_prompts']} {result['prompts']} prompts x {result['max_new_tokens']} new tokens, "
        f"S = {result['steps']}, fp32, tau (and its fraction of the greedy tau):\n\n"
    )
    return head + "\n".join(rows)


def data_mix_table(name: str) -> str:
    """Training runs side by side (scripts/collect_training_runs.py): their data, budget, and the
    held-out tau they start from and reach."""
    result = _load(name)
    if result is None:
        return "(no results yet)"
    rows = [
        "| run | data | training sequences | response tokens | steps | tokens seen | held-out tau at start | best held-out tau (step) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        e, start = r["eval"], r["curve"][0]
        best = max(r["curve"], key=lambda c: c["heldout_tau"])
        rows.append(
            f"| {r['label']} | {r['data']} | {e['train_sequences']:,} | {e['train_response_tokens'] / 1e6:.2f}M | "
            f"{e['steps']:,} | {e['train_tokens_seen'] / 1e6:.1f}M | {start['heldout_tau']:.2f} | "
            f"**{best['heldout_tau']:.2f}** ({best['step']}) |"
        )
    return f"{result['machine']['cpu_flags']}, torch {result['machine']['torch']}:\n\n" + "\n".join(rows)


TABLES = {
    "drafter-training": lambda: training_table("drafter_training.json"),
    "data-mix-cpu": lambda: data_mix_table("data_mix_cpu.json"),
    "candidate-sharegpt": lambda: drafter_table("drafter_candidate_sharegpt.json"),
    "candidate-project": lambda: drafter_table("drafter_candidate_project.json"),
    "candidate-humaneval": lambda: drafter_table("drafter_candidate_humaneval.json"),
    "throughput-fp32": lambda: throughput_table(["throughput_fp32.json", "throughput_fp32_b32.json"]),
    "throughput-bf16": lambda: throughput_table(["throughput_bf16.json", "throughput_bf16_b32.json"]),
    "latency": lambda: latency_table(
        [
            ("latency_fp32.json", "fp32, packed"),
            ("latency_fp32_default_kernels.json", "fp32, default"),
            ("latency_bf16.json", "bf16, packed"),
            ("latency_bf16_default_kernels.json", "bf16, default"),
        ]
    ),
    "drafters-fp32": lambda: drafter_table("drafters_fp32.json"),
    "throughput-int4": lambda: throughput_table(["throughput_int4.json"]),
    "int4-batch1": lambda: drafter_table("int4_batch1.json"),
    "latency-int4": lambda: latency_table([("latency_int4.json", "int4 (bf16 activations)")]),
    "dflash": lambda: dflash_table("dflash_offline_tau.json", "dflash_transformers.json"),
    "sampling": lambda: sampling_table("sampling_bf16.json"),
    "tree-tau-temperature": lambda: sweep_by_temperature_table("tree_tau_temperature.json"),
    "vllm-peer": lambda: peers_table("vllm_peer_bf16.json"),
    "vllm-check": lambda: vllm_check_table("vllm_check.json"),
    "vllm-check-bf16": lambda: vllm_check_table("vllm_check_bf16.json"),
    "vllm-split": lambda: vllm_split_table("vllm_check_bf16.json"),
    "kernel-choice-avx2": lambda: kernel_choice_table("kernel_choice_fp32_avx2.json"),
    "sharegpt-batch1-avx2": lambda: throughput_table(["sharegpt_batch1_fp32_avx2.json"]),
    "sharegpt-amx": lambda: throughput_table(["sharegpt_bf16_amx.json"]),
}
PATTERN = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str) -> str:
    return PATTERN.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a document is out of date, write nothing")
    args = p.parse_args(argv)
    stale = []
    for doc in (ROOT / "README.md", ROOT / "BENCHMARKS.md"):
        old = doc.read_text()
        new = render(old)
        if new != old:
            stale.append(doc.name)
            if not args.check:
                tmp = doc.with_suffix(".md.tmp")
                tmp.write_text(new)
                tmp.replace(doc)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python scripts/benchmark_tables.py)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
