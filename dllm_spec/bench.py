"""Side-by-side benchmark: plain autoregressive decoding vs each drafter, interleaved and repeated
in one run, on one target. Reports tau, tokens/s and the ratio to plain AR (ratios, not absolute
times, are what carries between machines)."""

from __future__ import annotations

import os
import statistics
import sys

import torch
from tqdm.auto import tqdm

from dllm_spec.drafters import build_drafter
from dllm_spec.policy import FixedLength, build_policy
from dllm_spec.prompt import Prompt, read_prompts
from dllm_spec.speculator import DiffusionSpeculator

BASELINE = "none"


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


def run_bench(
    spec: DiffusionSpeculator,
    drafter_specs: list[str],
    prompts: list[Prompt],
    max_new_tokens: int = 256,
    repeats: int = 2,
    block_size: int = 16,
    temperature: float = 0.0,
    default_policy: str = "adaptive",
    on_result=None,
    min_new_tokens: int = 0,
    ignore_eos: bool = False,
    peers: tuple[str, ...] = (),
    sampling: str = "reproducible",
) -> dict:
    """Run every (prompt, variant) ``repeats`` times, interleaving variants within each prompt
    (rotating their order every repeat) so that machine drift hits them all alike. A variant is
    ``drafter`` or ``drafter@policy``; ``block_size`` is the longest draft; ``peers`` are other
    engines' plain decoding (:mod:`dllm_spec.peers`, e.g. ``llama.cpp``), each run in a child
    process: a peer that crashes is reported under ``failed`` (with its signal) and skipped from
    then on, and the other variants' results are kept. ``on_result`` receives the partial result
    after every prompt (write it out: a crash keeps what finished)."""
    from dllm_spec.peers import PeerCrashed, build_peer

    names = [BASELINE] + [d for d in drafter_specs if d != BASELINE]
    speculators = {name: build_variant(name, spec, default_policy, block_size) for name in names}
    failed: dict[str, str] = {}
    try:
        for peer in peers:
            names.append(peer)
            try:
                speculators[peer] = build_peer(peer, spec, isolated=True)
            except PeerCrashed as exc:
                _crashed(failed, peer, exc)
        records = []
        spec.generate(prompts[0].generate_input, max_new_tokens=8)  # warm-up
        bar = tqdm(total=repeats * len(prompts) * len(names), desc="bench", unit="run")
        for r in range(repeats):
            for prompt in prompts:
                order = names[r % len(names) :] + names[: r % len(names)]
                mine: dict[str, tuple[dict, list[int]]] = {}  # this prompt's record and output per variant
                for name in order:
                    bar.update()
                    if name in failed:
                        continue
                    try:
                        out = speculators[name].generate(
                            prompt.generate_input,
                            max_new_tokens=max_new_tokens,
                            temperature=temperature,
                            seed=r,
                            sampling=sampling,
                            min_new_tokens=min_new_tokens,
                            ignore_eos=ignore_eos,
                        )
                    except PeerCrashed as exc:
                        _crashed(failed, name, exc)
                        continue
                    mine[name] = (_record(r, prompt, name, out.stats), out.token_ids[0].tolist())
                    records.append(mine[name][0])
                if temperature == 0:
                    for record, output in mine.values():
                        record["identical_to_ar"] = output == mine[BASELINE][1]
                if on_result is not None:
                    on_result(
                        _result(spec, records, max_new_tokens, repeats, block_size, temperature, len(prompts), failed)
                    )
        bar.close()
    finally:
        for variant in speculators.values():
            if hasattr(variant, "close"):
                variant.close()
    return _result(spec, records, max_new_tokens, repeats, block_size, temperature, len(prompts), failed)


def _crashed(failed: dict[str, str], name: str, exc: Exception) -> None:
    """Note that the peer ``name`` crashed: said once on stderr, its runs skipped from then on."""
    failed[name] = str(exc)
    tqdm.write(f"bench: {exc}; it is reported as failed and the other variants go on", file=sys.stderr)


def _record(repeat: int, prompt: Prompt, name: str, s) -> dict:
    """One run's row of the results."""
    return dict(
        repeat=repeat,
        prompt_id=prompt.id,
        category=prompt.category,
        drafter=name,
        new_tokens=s.new_tokens,
        target_forwards=s.target_forwards,
        tau=s.tau,
        wall_time_s=s.wall_time_s,
        draft_time_s=s.draft_time_s,
        verify_time_s=s.verify_time_s,
        acceptance_rate=s.acceptance_rate,
        calibration_error=s.calibration_error,
        prediction_bias=s.prediction_bias,
        mean_verified=sum(s.verified_lengths) / max(1, len(s.verified_lengths)),
        accepted_per_position=s.accepted_per_position,
        verified_per_position=s.verified_per_position,
    )


def _result(spec, records, max_new_tokens, repeats, block_size, temperature, prompts, failed=None) -> dict:
    return dict(
        config=dict(
            max_new_tokens=max_new_tokens,
            repeats=repeats,
            block_size=block_size,
            temperature=temperature,
            dtype=str(spec.target.dtype),
            device=str(spec.target.device),
            threads=torch.get_num_threads(),
            kernels=getattr(spec.target, "dllm_kernels", "default"),
            prompts=prompts,
        ),
        summary=summarize(records),
        records=records,
        failed=dict(failed or {}),
    )


def _aggregate(rows: list[dict]) -> tuple[float, float]:
    tokens = sum(r["new_tokens"] for r in rows)
    return tokens / sum(r["wall_time_s"] for r in rows), tokens / max(1, sum(r["target_forwards"] for r in rows))


def summarize(records: list[dict]) -> dict:
    """Per drafter and category: tokens/s, tau and the speedup over plain AR (median over repeats of
    the per-repeat throughput ratio)."""
    out: dict = {}
    categories = sorted({r["category"] for r in records}) + ["all"]
    drafter_names = list(dict.fromkeys(r["drafter"] for r in records))
    repeats = sorted({r["repeat"] for r in records})
    for name in drafter_names:
        out[name] = {}
        for cat in categories:
            ratios, tps, taus = [], [], []
            for rep in repeats:
                sel = [r for r in records if r["repeat"] == rep and (cat == "all" or r["category"] == cat)]
                mine = [r for r in sel if r["drafter"] == name]
                base = [r for r in sel if r["drafter"] == BASELINE]
                if not mine or not base:
                    continue
                t, tau = _aggregate(mine)
                tps.append(t)
                taus.append(tau)
                ratios.append(t / _aggregate(base)[0])
            rows = [r for r in records if r["drafter"] == name and (cat == "all" or r["category"] == cat)]
            identical = [r.get("identical_to_ar") for r in rows]
            calib = [r["calibration_error"] for r in rows if r.get("calibration_error") is not None]
            out[name][cat] = dict(
                tokens_per_s=statistics.median(tps),
                tau=statistics.median(taus),
                speedup=statistics.median(ratios),
                identical=None if None in identical else all(identical),
                mean_verified=statistics.fmean(r.get("mean_verified", 0.0) for r in rows),
                calibration_error=statistics.fmean(calib) if calib else None,
            )
    return out


def format_table(summary: dict) -> str:
    """A markdown table: one row per drafter and category."""
    lines = [
        "| drafter@policy | category | tau | tokens/s | speedup vs AR | mean verified | calib. err | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cats in summary.items():
        for cat, m in cats.items():
            cal = "" if m.get("calibration_error") is None else f"{m['calibration_error']:.2f}"
            lines.append(
                f"| {name} | {cat} | {m['tau']:.2f} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | "
                f"{m.get('mean_verified', 0):.1f} | {cal} | {m['identical']} |"
            )
    return "\n".join(lines)
