"""The one experiment runner every benchmark runs on (:mod:`dllm_spec.bench.speed`,
:mod:`~dllm_spec.bench.throughput`, :mod:`~dllm_spec.bench.study`).

It owns:

- variants: :func:`build_variant` turns ``drafter`` or ``drafter@policy`` into a speculator over
  one target (:data:`BASELINE` is plain autoregressive decoding);
- prompts: :func:`load_prompt_file` (a file or an evaluation set) and :func:`default_prompts`
  (the project's held-out prompts);
- the schedule: :func:`interleave` runs every variant on one job (a prompt, a batch size, ...)
  back to back, rotating their order every repeat so that machine drift hits them all alike;
- timing: :func:`timed` (wall clock, a CUDA device synchronised) and :func:`tokens_per_s`;
- the machine a result was measured on: :func:`describe_machine`, :func:`cpu_flags`,
  :func:`machine_line`;
- the result file: :func:`check_out` refuses a bad or existing ``--out`` before any work (unless
  ``--overwrite``), :func:`write_json` replaces it atomically as results come in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from dllm_spec.drafters import build_drafter
from dllm_spec.jsonl import write_atomic
from dllm_spec.policy import FixedLength, build_policy
from dllm_spec.prompt import Prompt, read_prompts
from dllm_spec.speculator import DiffusionSpeculator
from dllm_spec.timing import wall_clock

#: the variant every ratio is taken against: plain autoregressive decoding in this library's loop
BASELINE = "none"

Job = TypeVar("Job")
Out = TypeVar("Out")


# ---- variants and prompts ---------------------------------------------------------------------
def build_variant(label: str, spec: DiffusionSpeculator, default_policy: str, max_k: int) -> DiffusionSpeculator:
    """``drafter`` or ``drafter@policy`` (e.g. ``prompt-lookup@fixed:8``, ``prompt-lookup@adaptive``)."""
    drafter_spec, _, policy_spec = label.partition("@")  # drafter specs never contain "@"
    drafter = build_drafter(drafter_spec, spec.target)
    policy = FixedLength(0) if drafter_spec == BASELINE else build_policy(policy_spec or default_policy, max_k)
    return DiffusionSpeculator(spec.target, spec.tokenizer, drafter, spec.config, policy=policy)


def load_prompt_file(path: str | os.PathLike, limit: int | None = None) -> list[Prompt]:
    """Plain text (one prompt per line) or JSONL with ``prompt`` (and optional ``id``, ``category``),
    or the name of an external evaluation set (``humaneval``: :mod:`dllm_spec.data.eval_sets`)."""
    from dllm_spec.data.eval_sets import EXTERNAL_SETS, external_prompts

    return external_prompts(str(path), limit) if str(path) in EXTERNAL_SETS else read_prompts(path)[:limit]


def default_prompts(per_category: int = 2) -> list[Prompt]:
    """The project's held-out prompts (never used for drafter training), balanced by category."""
    from dllm_spec.data.prompts import heldout_prompts

    return heldout_prompts(per_category)


# ---- the schedule -----------------------------------------------------------------------------
def rotated(names: Sequence[str], shift: int) -> list[str]:
    """``names`` rotated left by ``shift`` (modulo their number)."""
    k = shift % len(names) if names else 0
    return [*names[k:], *names[:k]]


def interleave(
    jobs: Iterable[tuple[int, Job]], names: Sequence[str], desc: str
) -> Iterator[tuple[int, Job, Iterator[str]]]:
    """For each ``(repeat, job)``: the repeat, the job and the variants' order for it, ``names``
    rotated by the repeat so that machine drift hits every variant alike. A progress bar counts
    runs: it moves as the order is iterated (iterate it once)."""
    jobs = list(jobs)
    bar = tqdm(total=len(jobs) * len(names), desc=desc, unit="run")
    try:
        for repeat, job in jobs:
            yield repeat, job, _ticking(rotated(names, repeat), bar)
    finally:
        bar.close()


def _ticking(order: list[str], bar) -> Iterator[str]:
    """``order``, moving ``bar`` on by one run before each name."""
    for name in order:
        bar.update()
        yield name


# ---- timing -----------------------------------------------------------------------------------
def timed(device: torch.device, run: Callable[[], Out]) -> tuple[Out, float]:
    """``run()`` and the seconds it took; a CUDA ``device`` is synchronised before and after, so
    the time covers the device's work (:func:`dllm_spec.timing.wall_clock`)."""
    start = wall_clock(device)
    out = run()
    return out, wall_clock(device) - start


def tokens_per_s(rows: Iterable[dict]) -> float:
    """New tokens per second over a group of runs (``new_tokens`` and ``wall_time_s`` summed)."""
    rows = list(rows)
    return sum(r["new_tokens"] for r in rows) / sum(r["wall_time_s"] for r in rows)


# ---- the machine ------------------------------------------------------------------------------
def describe_machine(target) -> dict:
    """What a result depends on besides its variants: the target's dtype and device, torch's CPU
    threads and the linear kernels (``kernels=`` of :func:`dllm_spec.target.load_target`)."""
    return dict(
        dtype=str(target.dtype),
        device=str(target.device),
        threads=torch.get_num_threads(),
        kernels=getattr(target, "dllm_kernels", "default"),
    )


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions that decide kernel speed (from /proc/cpuinfo)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown CPU"
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return "CPU flags " + (" ".join(shown) if shown else "none of avx2/avx512")


def machine_line(config: dict) -> str:
    """One line for a table's header: dtype, threads, kernels and CPU flags of a result's config."""
    return f"{config['dtype']}, {config['threads']} threads, kernels {config['kernels']}, {config['cpu_flags']}"


# ---- the result file --------------------------------------------------------------------------
def check_out(path: str | os.PathLike | None, overwrite: bool = False) -> Path | None:
    """Check an output path before any work: a regular file that does not exist yet (or
    ``overwrite``), in a writable folder. None when there is no path."""
    if not path:
        return None
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file path")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} is not a regular file (a device, a pipe, ...): give a file path")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists: pass --overwrite to replace it, or give a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out} is not writable")
    return out


def write_json(path: str | os.PathLike, result: dict) -> None:
    """Replace ``path`` with ``result`` atomically; a new file gets the umask's permissions (0644 under 022)."""
    write_atomic(path, json.dumps(result, indent=1))
