"""Held-out tau against training tokens, from one or more runs' ``train_log.jsonl`` (the evidence
of how far a drafter is from break-even and how much more data/compute it needs)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def heldout_points(log: str | os.PathLike) -> list[tuple[int, float]]:
    """(training tokens seen, held-out offline tau) at every evaluation of a run."""
    points = []
    for line in Path(log).read_text().splitlines():
        record = json.loads(line)
        if "heldout_tau" in record:
            points.append((int(record["tokens"]), float(record["heldout_tau"])))
    return points


def plot_heldout_tau(
    runs: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    break_even: float | None = None,
    offsets: dict[str, int] | None = None,
    log_x: bool = False,
) -> Path:
    """One line per run (label -> run directory or log file); optional horizontal break-even line.
    ``offsets`` (label -> tokens) shifts a run warm-started from another one's weights to where
    that run stopped, so the x axis stays "tokens seen by these weights". ``log_x``: a log-scale
    token axis (for runs that differ in compute by orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.set_prop_cycle(color=list(plt.cm.tab10.colors) + list(plt.cm.Dark2.colors))  # 18 distinct colours
    for label, path in runs.items():
        log = Path(path) / "train_log.jsonl" if Path(path).is_dir() else Path(path)
        pts = heldout_points(log)
        shift = (offsets or {}).get(label, 0)
        if pts:
            ax.plot([p[0] + shift for p in pts], [p[1] for p in pts], marker="o", label=label)
    if break_even is not None:
        ax.axhline(break_even, color="grey", linestyle="--", label=f"break-even tau {break_even:g}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("training tokens seen (sequence tokens)")
    ax.set_ylabel("held-out offline greedy tau")
    ax.set_title("Drafter quality vs training tokens (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Plot held-out tau against training tokens for training runs.")
    p.add_argument("runs", nargs="+", help="LABEL=PATH (run directory or train_log.jsonl)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--break-even", type=float, default=None)
    p.add_argument("--log-x", action="store_true", help="log-scale token axis")
    p.add_argument(
        "--offset",
        action="append",
        default=[],
        metavar="LABEL=TOKENS",
        help="shift a warm-started run by the tokens its starting weights had seen (repeatable)",
    )
    args = p.parse_args(argv)
    runs = dict(r.split("=", 1) for r in args.runs)
    offsets = {label: int(float(n)) for label, n in (o.split("=", 1) for o in args.offset)}
    unknown = set(offsets) - set(runs)
    if unknown:
        p.error(f"--offset names runs that are not plotted: {sorted(unknown)}")
    print(plot_heldout_tau(runs, args.out, args.break_even, offsets, args.log_x))


if __name__ == "__main__":
    main()
