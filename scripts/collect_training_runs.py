"""Collect drafter training runs (their config, eval.json and every held-out evaluation of their
train_log.jsonl) into one benchmark file, for a table of held-out tau against training tokens:

    python scripts/collect_training_runs.py "on-policy=runs/onpolicy" "off-policy text=runs/text" \\
        --description "..." --data "on-policy=data/sharegpt shards 0-18" --out benchmarks/data_mix_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch

from dllm_spec.bench.runner import cpu_flags
from dllm_spec.jsonl import write_atomic


def read_run(directory: Path) -> dict:
    """A run directory's config, summary and held-out curve (step, tokens, time_s, taus)."""
    for name in ("train_config.json", "eval.json", "train_log.jsonl"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name}; is it a finished training run?")
    log = [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines() if line.strip()]
    keys = ("step", "tokens", "time_s", "heldout_tau", "train_tau")
    finite = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731 (no greedy training sequence: NaN)
    return {
        "config": json.loads((directory / "train_config.json").read_text()),
        "eval": json.loads((directory / "eval.json").read_text()),
        "curve": [{k: finite(r[k]) for k in keys if k in r} for r in log if "heldout_tau" in r],
    }


def parse_pair(text: str, flag: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    if not sep or not label or not value:
        raise SystemExit(f"{flag}: expected LABEL=VALUE, got {text!r}")
    return label, value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    p.add_argument("--data", action="append", default=[], help="LABEL=what the run trained on (repeatable)")
    p.add_argument("--description", required=True)
    p.add_argument("--command", default="", help="the command that made the runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data = dict(parse_pair(d, "--data") for d in args.data)
    runs = []
    for item in args.runs:
        label, directory = parse_pair(item, "runs")
        runs.append({"label": label, "data": data.get(label, ""), **read_run(Path(directory))})
    result = {
        "description": args.description,
        "command": args.command,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "torch": torch.__version__},
        "runs": runs,
    }  # fmt: skip
    write_atomic(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}: {', '.join(r['label'] for r in runs)}")


if __name__ == "__main__":
    main()
