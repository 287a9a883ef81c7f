"""``dllm-spec study``: speedup on long outputs. Output length x drafter x block policy x
temperature, every variant side by side in one process on the runner's interleaved schedule
(:func:`dllm_spec.bench.runner.interleave`: per prompt, order rotated every repeat), speedup =
ratio of medians against plain AR in the same run. Also transformers' own assisted generation
(with the same early-exit AR drafter, and its prompt lookup) and its plain ``generate`` as
external peers, and other engines (:mod:`dllm_spec.bench.peers`).

Results are appended to ``records.jsonl`` as they come (a rerun skips finished runs), then
summarised into ``results.csv``, ``summary.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dllm_spec.bench.peers import PEERS, build_peer
from dllm_spec.bench.runner import (
    BASELINE,
    build_variant,
    default_prompts,
    interleave,
    load_prompt_file,
    timed,
    tokens_per_s,
)
from dllm_spec.jsonl import append_record, read_records, write_atomic
from dllm_spec.prompt import Prompt
from dllm_spec.speculator import DiffusionSpeculator
from dllm_spec.stats import GenerationStats

#: transformers: plain greedy, plain greedy on its static cache (which ``generate`` compiles on GPUs),
#: assisted generation, prompt lookup
HF_PEERS = ("hf-generate", "hf-static", "hf-assisted", "hf-prompt-lookup")


@dataclass(frozen=True)
class StudyConfig:
    """What the study crosses: output lengths x drafters x policies x temperatures, with peers,
    ``repeats`` per prompt and ``per_category`` held-out prompts per category."""

    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    drafters: tuple[str, ...] = ("prompt-lookup", "early-exit:26")
    policies: tuple[str, ...] = ("fixed:8", "adaptive")
    temperatures: tuple[float, ...] = (0.0, 1.0)
    peers: tuple[str, ...] = ("hf-assisted", "hf-prompt-lookup")
    repeats: int = 2
    per_category: int = 1
    max_k: int = 16
    min_new_tokens: int = 0
    ignore_eos: bool = False  # long-output studies reach their lengths (transformers' peers suppress EOS instead)

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if self.repeats < 1 or self.per_category < 1:
            raise ValueError("repeats and per_category must be >= 1")
        if any(p not in HF_PEERS + PEERS for p in self.peers):
            raise ValueError(f"peers must be among {HF_PEERS + PEERS}, got {self.peers}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if any(p in PEERS for p in self.peers) and (any(t != 0 for t in self.temperatures) or self.min_new_tokens):
            raise ValueError(
                f"peers {[p for p in self.peers if p in PEERS]} decode greedily without min_new_tokens: "
                "use temperatures 0 (and ignore_eos for long outputs)"
            )

    @classmethod
    def quick(cls) -> "StudyConfig":
        """A few minutes on 2 CPU cores (``--quick``)."""
        return cls(
            lengths=(32, 64),
            drafters=("prompt-lookup",),
            policies=("fixed:8", "adaptive"),
            temperatures=(0.0, 1.0),
            peers=("hf-prompt-lookup",),
            repeats=1,
            per_category=1,
        )


#: one run of a variant: (prompt, new tokens, temperature, repeat) -> its row of records.jsonl
Run = Callable[[Prompt, int, float, int], dict]
#: what identifies a run in records.jsonl (a rerun skips the runs it finds)
RUN_KEY = ("length", "temperature", "prompt_id", "repeat", "variant")


def run_study(spec: DiffusionSpeculator, prompts: list[Prompt], cfg: StudyConfig, out_dir: str | Path) -> Path:
    """Run (or resume) the study; write records.jsonl, results.csv, summary.md and plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    done = {tuple(r[k] for k in RUN_KEY) for r in read_records(records_path)}
    runs = study_variants(spec, cfg)
    jobs = [
        (r, (length, temp, p))
        for length in cfg.lengths
        for temp in cfg.temperatures
        for r in range(cfg.repeats)
        for p in prompts
    ]
    for rep, (length, temp, prompt), order in interleave(jobs, list(runs), "study"):
        for label in order:
            if (length, temp, prompt.id, rep, label) in done:
                continue
            row = runs[label](prompt, length, temp, rep)
            append_record(
                records_path,
                dict(
                    length=length,
                    temperature=temp,
                    prompt_id=prompt.id,
                    category=prompt.category,
                    repeat=rep,
                    variant=label,
                    **row,
                ),
            )
    summarise(out)
    return out


def study_variants(spec: DiffusionSpeculator, cfg: StudyConfig) -> dict[str, Run]:
    """The study's variants in their interleaving order: plain AR, each drafter@policy, then the
    peers (transformers' and other engines'), each as a function that runs it once."""
    runs: dict[str, Run] = {}
    for label in [BASELINE] + [f"{d}@{p}" for d in cfg.drafters for p in cfg.policies]:
        runs[label] = partial(_run_ours, build_variant(label, spec, "adaptive", cfg.max_k), cfg)
    assistant = _assistant(spec) if "hf-assisted" in cfg.peers else None
    for name in cfg.peers:
        if name in PEERS:  # other engines' plain decoding
            runs[name] = partial(_run_engine, build_peer(name, spec), cfg)
        else:
            runs[name] = partial(_run_hf, spec, name, assistant, cfg)
    return runs


def _assistant(spec: DiffusionSpeculator):
    """transformers' assistant model for ``hf-assisted``: the same early-exit AR drafter as ours."""
    from dllm_spec.drafters import AutoregressiveDrafter

    assistant = AutoregressiveDrafter.from_target_layers(spec.target, None).model
    assistant.generation_config.num_assistant_tokens = 8
    return assistant


def _row(s: GenerationStats, tau: bool) -> dict:
    """A run's measurements; ``tau`` and the acceptance per position only for this library's variants."""
    return dict(
        new_tokens=s.new_tokens,
        wall_time_s=s.wall_time_s,
        tau=s.tau if tau else None,
        accepted_per_position=s.accepted_per_position if tau else None,
        verified_per_position=s.verified_per_position if tau else None,
    )


def _run_ours(
    runner: DiffusionSpeculator, cfg: StudyConfig, prompt: Prompt, length: int, temp: float, rep: int
) -> dict:
    """One run of plain AR or a drafter@policy variant in this library's loop."""
    out = runner.generate(
        prompt.generate_input,
        max_new_tokens=length,
        temperature=temp,
        seed=rep,
        min_new_tokens=min(cfg.min_new_tokens, length),
        ignore_eos=cfg.ignore_eos,
    )
    return _row(out.stats, tau=True)


def _run_engine(engine, cfg: StudyConfig, prompt: Prompt, length: int, temp: float, rep: int) -> dict:
    """One run of another engine's plain decoding (:mod:`dllm_spec.bench.peers`)."""
    out = engine.generate(prompt.generate_input, max_new_tokens=length, temperature=temp, ignore_eos=cfg.ignore_eos)
    return _row(out.stats, tau=False)


def _run_hf(
    spec: DiffusionSpeculator,
    label: str,
    assistant,
    cfg: StudyConfig,
    prompt: Prompt,
    length: int,
    temp: float,
    rep: int,
) -> dict:
    """One run of transformers' ``generate`` as the peer ``label`` (:data:`HF_PEERS`); it suppresses
    EOS (``min_new_tokens``) where the study ignores it."""
    min_new_tokens = length if cfg.ignore_eos else min(cfg.min_new_tokens, length)
    ids = spec.encode(prompt.generate_input)
    kwargs = dict(max_new_tokens=length, do_sample=temp > 0, pad_token_id=spec.tokenizer.eos_token_id)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if temp > 0:
        kwargs.update(temperature=temp, top_k=0, top_p=1.0)
    if label == "hf-assisted":
        kwargs["assistant_model"] = assistant
    elif label == "hf-prompt-lookup":
        kwargs["prompt_lookup_num_tokens"] = 10
    elif label == "hf-static":
        kwargs["cache_implementation"] = "static"
    torch.manual_seed(rep)
    out, wall = timed(spec.target.device, lambda: spec.target.generate(ids, **kwargs))
    return dict(
        new_tokens=out.shape[1] - ids.shape[1],
        wall_time_s=wall,
        tau=None,
        accepted_per_position=None,
        verified_per_position=None,
    )


def _speedups(records: list[dict]) -> dict:
    """(variant, temperature, length) -> median over repeats of (variant tok/s / AR tok/s) and median tau."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[(r["variant"], r["temperature"], r["length"], r["repeat"])].append(r)
    out = {}
    for (variant, temp, length, rep), rows in groups.items():
        base = groups.get((BASELINE, temp, length, rep))
        if not base:
            continue
        tps, base_tps = tokens_per_s(rows), tokens_per_s(base)
        taus = [r["tau"] for r in rows if r["tau"] is not None]
        out.setdefault((variant, temp, length), []).append(
            (tps / base_tps, tps, statistics.fmean(taus) if taus else None)
        )
    return {
        k: dict(
            speedup=statistics.median(v[0] for v in vals),
            tokens_per_s=statistics.median(v[1] for v in vals),
            tau=None if vals[0][2] is None else statistics.median(v[2] for v in vals),
        )
        for k, vals in out.items()
    }


def summarise(out: Path) -> dict:
    """Write results.csv, summary.md and the plots from records.jsonl."""
    records = read_records(out / "records.jsonl")
    table = _speedups(records)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["variant", "temperature", "length", "speedup", "tokens_per_s", "tau"])
    lines = ["| variant | temperature | new tokens | speedup vs AR | tokens/s | tau |", "|---|---|---|---|---|---|"]
    for (variant, temp, length), m in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        tau = "" if m["tau"] is None else f"{m['tau']:.2f}"
        writer.writerow([variant, temp, length, f"{m['speedup']:.3f}", f"{m['tokens_per_s']:.2f}", tau])
        lines.append(f"| {variant} | {temp:g} | {length} | {m['speedup']:.2f}x | {m['tokens_per_s']:.1f} | {tau} |")
    write_atomic(out / "results.csv", buf.getvalue())
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")
    _plots(records, table, out)
    return table


def _plots(records: list[dict], table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({k[1] for k in table})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {
        v: palette[i % len(palette)] for i, v in enumerate(sorted({k[0] for k in table}))
    }  # one colour per variant
    fig, axes = plt.subplots(2, len(temps), figsize=(6 * len(temps), 7), squeeze=False)
    for col, temp in enumerate(temps):
        speed_ax, tau_ax = axes[0][col], axes[1][col]
        for variant in sorted({k[0] for k in table if k[1] == temp}):
            pts = sorted((k[2], v["speedup"], v["tau"]) for k, v in table.items() if k[0] == variant and k[1] == temp)
            speed_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant, color=colors[variant])
            if variant != BASELINE and all(p[2] is not None for p in pts):
                tau_ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=variant, color=colors[variant])
        for ax in (speed_ax, tau_ax):
            ax.set_xscale("log", base=2)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        speed_ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        speed_ax.set(
            title=f"speedup vs output length (T={temp:g})", xlabel="new tokens", ylabel="speedup over plain AR"
        )
        tau_ax.set(title=f"tau vs output length (T={temp:g})", xlabel="new tokens", ylabel="tokens per target forward")
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_length.png", dpi=110)
    plt.close(fig)

    cat_tau: dict = defaultdict(list)
    for r in records:
        if r["tau"] is not None and r["temperature"] == 0 and r["variant"] != BASELINE:
            cat_tau[(r["variant"], r["category"])].append(r["tau"])
    if cat_tau:
        variants = sorted({k[0] for k in cat_tau})
        cats = sorted({k[1] for k in cat_tau})
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(cats)), 4))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ax.bar(
                [c + i * width for c in range(len(cats))],
                [statistics.fmean(cat_tau.get((v, c), [0])) for c in cats],
                width,
                label=v,
            )
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))], cats)
        ax.set(title="tau by prompt category (greedy)", ylabel="tokens per target forward")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "tau_by_category.png", dpi=110)
        plt.close(fig)

    acc: dict = defaultdict(lambda: [[], []])
    for r in records:
        if r.get("accepted_per_position") and r["variant"] != BASELINE:
            a, v = acc[r["variant"]]
            for i, (x, y) in enumerate(zip(r["accepted_per_position"] + [0] * 64, r["verified_per_position"])):
                while len(a) <= i:
                    a.append(0)
                    v.append(0)
                a[i] += x
                v[i] += y
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, (a, v) in sorted(acc.items()):
            rates = [x / y for x, y in zip(a, v) if y > 0]
            ax.plot(range(1, len(rates) + 1), rates, marker=".", label=variant)
        ax.set(title="acceptance rate by draft position", xlabel="position in draft", ylabel="accepted / verified")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "acceptance_by_position.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dllm-spec study", description="Speedup study on long outputs.")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    p.add_argument("--lengths", default=None, help="comma-separated new-token counts")
    p.add_argument("--drafters", default=None, help="comma-separated drafter specs")
    p.add_argument("--policies", default=None, help="comma-separated policy specs")
    p.add_argument("--temperatures", default=None)
    p.add_argument(
        "--peers",
        default=None,
        help="comma-separated, from hf-generate, hf-static, hf-assisted, hf-prompt-lookup, llama.cpp (or empty)",
    )
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--per-category", type=int, default=None)
    p.add_argument("--prompts", default=None)
    p.add_argument("--target", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--min-new-tokens", type=int, default=None, help="suppress stop ids until this many new tokens")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS: every run reaches its length")
    from dllm_spec.cli_errors import exits_cleanly

    args = p.parse_args(argv)
    with exits_cleanly("dllm-spec study", (ValueError, OSError)):
        out = _run(args)
    print((out / "summary.md").read_text())


def _run(args: argparse.Namespace) -> Path:
    """``study`` after parsing: build the config, load the model, run; returns the output directory."""
    base = StudyConfig.quick() if args.quick else StudyConfig()
    overrides = {}
    for name, conv in (("drafters", str), ("policies", str), ("peers", str)):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = tuple(conv(x) for x in value.split(",") if x.strip())
    for name in ("repeats", "per_category", "min_new_tokens"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.ignore_eos:
        overrides["ignore_eos"] = True
    for name, conv in (("lengths", int), ("temperatures", float)):
        value = getattr(args, name)
        if value is not None:
            try:
                overrides[name] = tuple(conv(x) for x in value.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"--{name} must be comma-separated numbers, got {value!r}") from None
    cfg = StudyConfig(**{**base.__dict__, **overrides})
    prompts = load_prompt_file(args.prompts) if args.prompts else default_prompts(cfg.per_category)
    from dllm_spec import DiffusionSpeculator

    spec = DiffusionSpeculator.from_pretrained(args.target, drafter="none", dtype=args.dtype)
    return run_study(spec, prompts, cfg, args.out)


if __name__ == "__main__":
    main()
