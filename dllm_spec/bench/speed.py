"""``dllm-spec bench``: plain autoregressive decoding vs each drafter at batch 1, side by side:
interleaved and repeated in one run on one target (:func:`dllm_spec.bench.runner.interleave`),
with other engines' plain decoding as peers. Reports tau, tokens/s and the ratio to plain AR
(ratios, not absolute times, are what carries between machines)."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

from tqdm.auto import tqdm

from dllm_spec.bench.peers import VLLM, VllmOptions, peer_status
from dllm_spec.bench.runner import BASELINE, build_variant, describe_machine, interleave, tokens_per_s
from dllm_spec.prompt import Prompt
from dllm_spec.speculator import DiffusionSpeculator
from dllm_spec.stats import GenerationStats


def run_bench(
    spec: DiffusionSpeculator,
    drafter_specs: list[str],
    prompts: list[Prompt],
    max_new_tokens: int = 256,
    repeats: int = 2,
    block_size: int = 16,
    temperature: float = 0.0,
    default_policy: str = "adaptive",
    on_result: Callable[[dict], None] | None = None,
    min_new_tokens: int = 0,
    ignore_eos: bool = False,
    peers: tuple[str, ...] = (),
    sampling: str = "reproducible",
    vllm: VllmOptions | None = None,
) -> dict:
    """Run every (prompt, variant) ``repeats`` times, interleaving variants within each prompt
    (rotating their order every repeat) so that machine drift hits them all alike. A variant is
    ``drafter`` or ``drafter@policy``; ``block_size`` is the longest draft; ``peers`` are other
    engines (:mod:`dllm_spec.bench.peers`: ``llama.cpp``; ``vllm``, configured by ``vllm``, adds vLLM
    plain and vLLM with the DFlash-layout drafter), each run in a child process: a peer that fails to
    start or crashes is reported under ``failed`` (with its reason or signal) and skipped from then
    on, and the other variants' results are kept; ``peer_setup`` holds each vLLM variant's status
    and start-up times (never part of tokens/s). ``on_result`` receives the partial result after
    every prompt (write it out: a crash keeps what finished)."""
    from dllm_spec.bench.peers import PeerCrashed

    config = dict(
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        block_size=block_size,
        temperature=temperature,
        **describe_machine(spec.target),
        prompts=len(prompts),
    )
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        sampling=sampling,
        min_new_tokens=min_new_tokens,
        ignore_eos=ignore_eos,
    )
    names = [BASELINE] + [d for d in drafter_specs if d != BASELINE]
    variants = {name: build_variant(name, spec, default_policy, block_size) for name in names}
    records: list[dict] = []
    failed: dict[str, str] = {}
    setup: dict[str, dict] = {}
    try:
        rows = [spec.encode(p.generate_input)[0].tolist() for p in prompts] if VLLM in peers else []
        names += _start_peers(peers, spec, variants, failed, setup, vllm or VllmOptions(), rows, max_new_tokens)
        spec.generate(prompts[0].generate_input, max_new_tokens=8)  # warm-up
        for r, prompt, order in interleave(((r, p) for r in range(repeats) for p in prompts), names, "bench"):
            mine: dict[str, tuple[dict, list[int]]] = {}  # this prompt's record and output per variant
            for name in order:
                if name in failed:
                    continue
                try:
                    out = variants[name].generate(prompt.generate_input, seed=r, **kwargs)
                except PeerCrashed as exc:
                    _crashed(failed, name, exc)
                    continue
                mine[name] = (_record(r, prompt, name, out.stats), out.token_ids[0].tolist())
                records.append(mine[name][0])
            if temperature == 0:
                _mark_identical_to_ar(mine)
            if on_result is not None:
                on_result(_result(config, records, failed, setup))
    finally:
        for variant in variants.values():
            if hasattr(variant, "close"):
                variant.close()
    return _result(config, records, failed, setup)


def _start_peers(
    peers: tuple[str, ...],
    spec: DiffusionSpeculator,
    variants: dict,
    failed: dict[str, str],
    setup: dict[str, dict],
    vllm: VllmOptions,
    rows: list[list[int]],
    max_new_tokens: int,
) -> list[str]:
    """Start each peer in its own process into ``variants``; one that crashes or fails on start goes
    into ``failed`` (vLLM's into ``setup`` too, with its start-up times). Returns the peers' variant
    names (failed ones included: they are reported)."""
    from dllm_spec.bench.peers import PeerCrashed, build_peer, start_vllm_peers

    names: list[str] = []
    for peer in peers:
        if peer == VLLM:
            started, info = start_vllm_peers(spec, vllm, rows, max_new_tokens, max_num_seqs=1)
            variants.update(started)
            setup.update(info)
            failed.update({label: i["reason"] for label, i in info.items() if i.get("status") == "failed"})
            names += list(info)
            continue
        names.append(peer)
        try:
            variants[peer] = build_peer(peer, spec, isolated=True)
        except PeerCrashed as exc:
            _crashed(failed, peer, exc)
    return names


def _mark_identical_to_ar(mine: dict[str, tuple[dict, list[int]]]) -> None:
    """Greedy runs: mark in each variant's record of one prompt whether its output is plain AR's."""
    for record, output in mine.values():
        record["identical_to_ar"] = output == mine[BASELINE][1]


def _crashed(failed: dict[str, str], name: str, exc: Exception) -> None:
    """Note that the peer ``name`` crashed: said once on stderr, its runs skipped from then on."""
    failed[name] = str(exc)
    tqdm.write(f"bench: {exc}; it is reported as failed and the other variants go on", file=sys.stderr)


def _record(repeat: int, prompt: Prompt, name: str, s: GenerationStats) -> dict:
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


def _result(config: dict, records: list[dict], failed: dict[str, str], setup: dict[str, dict] | None = None) -> dict:
    """The result file's content: the run's config, the summary, every run's row, failed peers and
    (with vLLM) each vLLM variant's status, reason and start-up times."""
    result = dict(config=dict(config), summary=summarize(records), records=records, failed=dict(failed))
    if setup:
        result["peer_setup"] = peer_status(setup, failed)
    return result


def _aggregate(rows: list[dict]) -> tuple[float, float]:
    """Tokens/s and tau (new tokens per target forward) over a group of runs."""
    return tokens_per_s(rows), sum(r["new_tokens"] for r in rows) / max(1, sum(r["target_forwards"] for r in rows))


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
