"""``dllm-spec bench --batch-sizes``: throughput over a prompt set at several batch sizes, in one run,
on the runner's interleaved schedule (:func:`dllm_spec.bench.runner.interleave`, per batch size):
transformers' batched greedy ``generate`` (left padding, the prompts in order, ``batch`` at a time),
plain batched decoding in our loop (the same continuous-batching path with a drafter that proposes
nothing), and each speculative variant. Reports new tokens per second, ratios, tau and whether the
greedy outputs agree row by row (ratios, not absolute times, are what carries between machines)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial

import torch
from transformers import PreTrainedModel

from dllm_spec.bench.peers import VllmOptions, VllmPeer, peer_status, start_vllm_peers
from dllm_spec.bench.runner import build_variant, cpu_flags, describe_machine, interleave, timed
from dllm_spec.drafters import NullDrafter
from dllm_spec.policy import FixedLength
from dllm_spec.speculator import DiffusionSpeculator

HF = "transformers"
PLAIN = "plain"


def hf_generate(
    model: PreTrainedModel,
    tokenizer,
    rows: list[torch.Tensor],
    batch: int,
    max_new_tokens: int,
    stop_ids: frozenset[int],
) -> tuple[list[list[int]], float]:
    """transformers' batched greedy ``generate`` over ``rows`` (T_i,), ``batch`` at a time, left-padded.
    Returns each row's new tokens up to and including its first stop id, and the seconds taken."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), 0)

    def run() -> list[list[int]]:
        outputs: list[list[int]] = []
        for i in range(0, len(rows), batch):
            outputs += _hf_chunk(model, rows[i : i + batch], max_new_tokens, stop_ids, pad)
        return outputs

    return timed(model.device, run)


def _hf_chunk(
    model: PreTrainedModel, chunk: list[torch.Tensor], max_new_tokens: int, stop_ids: frozenset[int], pad: int
) -> list[list[int]]:
    """One left-padded batch through transformers' greedy ``generate``: each row's new tokens up to
    and including its first stop id."""
    width = max(r.numel() for r in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for j, r in enumerate(chunk):
        ids[j, width - r.numel() :] = r
        mask[j, width - r.numel() :] = 1
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return [
        seq[: next((k + 1 for k, t in enumerate(seq) if t in stop_ids), len(seq))] for seq in out[:, width:].tolist()
    ]


def throughput_variants(
    spec: DiffusionSpeculator, labels: list[str], default_policy: str, max_k: int
) -> dict[str, DiffusionSpeculator]:
    """The speculative variants besides plain batched decoding: ``default`` is ``spec`` itself (the
    library default), any other label a ``drafter@policy`` (:func:`~dllm_spec.bench.runner.build_variant`)."""
    return {
        label: spec if label == "default" else build_variant(label, spec, default_policy, max_k) for label in labels
    }


def stock_transformers_model(spec: DiffusionSpeculator, target: str | None) -> PreTrainedModel:
    """The model transformers' ``generate`` runs: ``spec``'s target when it has stock kernels (or is
    int4: the same int4 model), else the target loaded again with stock kernels."""
    if getattr(spec.target, "dllm_kernels", "default") in ("default", "int4"):
        return spec.target
    from dllm_spec.target import load_target

    model, _ = load_target(target, dtype=spec.target.dtype, device=spec.target.device, kernels="default")
    return model


def run_throughput(
    spec: DiffusionSpeculator,
    variants: dict[str, DiffusionSpeculator],
    prompts: list[str],
    batch_sizes: list[int],
    max_new_tokens: int = 256,
    repeats: int = 1,
    hf_model: PreTrainedModel | None = None,
    on_result: Callable[[dict], None] | None = None,
    vllm: VllmOptions | None = None,
) -> dict:
    """Every (batch size, variant) ``repeats`` times, variants interleaved and rotated per repeat.

    ``variants``: label -> speculator over ``spec``'s target (plain batched decoding is added as
    ``"plain"``); ``hf_model``: the model transformers' ``generate`` runs (default: ``spec.target``;
    pass an unpacked copy to compare against stock transformers kernels). ``vllm``: add vLLM plain
    and vLLM with the DFlash-layout drafter (:func:`dllm_spec.bench.peers.start_vllm_peers`), every
    prompt submitted with ``batch`` requests in flight; one that fails to start or crashes is
    reported under ``failed`` and ``peer_setup`` and the other variants go on. ``on_result``
    receives the partial result after every batch size (write it out: a crash keeps what finished).
    """
    if not prompts:
        raise ValueError("the throughput benchmark needs at least one prompt")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive, got {batch_sizes}")
    hf_model = hf_model or spec.target
    rows = [spec.encode(p)[0].cpu() for p in prompts]
    plain = DiffusionSpeculator(spec.target, spec.tokenizer, NullDrafter(), spec.config, policy=FixedLength(0))
    ours = {PLAIN: plain, **variants}
    stop_ids = spec._stop_ids(None)
    runs = {HF: partial(_run_hf, hf_model, spec.tokenizer, rows, max_new_tokens, stop_ids)}
    runs.update({name: partial(_run_ours, s, rows, max_new_tokens) for name, s in ours.items()})
    config = dict(max_new_tokens=max_new_tokens, repeats=repeats, prompts=len(prompts), batch_sizes=batch_sizes)
    config.update(describe_machine(spec.target), hf_kernels=getattr(hf_model, "dllm_kernels", "default"))
    config["cpu_flags"] = cpu_flags()
    records: list[dict] = []
    failed: dict[str, str] = {}
    result = dict(config=config, records=records)
    peers: dict[str, VllmPeer] = {}
    try:
        if vllm is not None:
            peers, setup = start_vllm_peers(
                spec, vllm, [r.tolist() for r in rows], max_new_tokens, min(max(batch_sizes), len(rows))
            )
            failed.update({label: i["reason"] for label, i in setup.items() if i.get("status") == "failed"})
            runs.update({name: partial(_run_peer, peer, rows, max_new_tokens) for name, peer in peers.items()})
            result.update(failed=failed, peer_setup=setup)
        _warm_up(ours, prompts, batch_sizes)
        hf_generate(hf_model, spec.tokenizer, rows[:1], 1, 4, stop_ids)
        jobs = ((r, b) for r in range(repeats) for b in batch_sizes)
        for r, batch, order in interleave(jobs, list(runs), "throughput"):
            _run_batch(runs, order, r, batch, min(batch, len(prompts)), records, failed)
            _summarize_into(result, failed)
            if on_result is not None:
                on_result(result)
    finally:
        for peer in peers.values():
            peer.close()
    _summarize_into(result, failed)
    return result


def _run_batch(
    runs: dict[str, Callable], order, repeat: int, batch: int, slots: int, records: list[dict], failed: dict[str, str]
) -> None:
    """Every variant (in ``order``) over the prompts at one batch size into ``records``; a peer that
    crashes goes into ``failed`` and is skipped from then on."""
    from dllm_spec.bench.peers import PeerCrashed, tqdm_write

    outputs: dict[str, list[list[int]]] = {}
    mine: list[dict] = []
    for name in order:
        if name in failed:
            continue
        try:
            outputs[name], seconds, tau = runs[name](slots)
        except PeerCrashed as exc:
            failed[name] = str(exc)
            tqdm_write(f"throughput: {exc}; it is reported as failed and the other variants go on")
            continue
        mine.append(_record(repeat, batch, name, outputs[name], seconds, tau))
    records += mine
    _mark_identical_rows(mine, outputs)


def _summarize_into(result: dict, failed: dict[str, str]) -> None:
    """The summary of the records so far, and the peers' status brought up to date."""
    result["summary"] = summarize(result["records"])
    if "peer_setup" in result:
        result["peer_setup"] = peer_status(result["peer_setup"], failed)


def _warm_up(ours: dict[str, DiffusionSpeculator], prompts: list[str], batch_sizes: list[int]) -> None:
    """A short run of each of our variants: warm-up, and the latency curves of every batch size."""
    for s in ours.values():
        s.generate(prompts[: max(batch_sizes)], max_new_tokens=4, batch_size=min(max(batch_sizes), len(prompts)))


def _run_hf(
    model: PreTrainedModel,
    tokenizer,
    rows: list[torch.Tensor],
    max_new_tokens: int,
    stop_ids: frozenset[int],
    slots: int,
) -> tuple[list[list[int]], float, None]:
    """transformers' batched ``generate`` over every row, ``slots`` at a time: outputs, seconds, no tau."""
    outs, seconds = hf_generate(model, tokenizer, rows, slots, max_new_tokens, stop_ids)
    return outs, seconds, None


def _run_ours(
    s: DiffusionSpeculator, rows: list[torch.Tensor], max_new_tokens: int, slots: int
) -> tuple[list[list[int]], float, float]:
    """Our loop over every row with ``slots`` rows in flight: outputs, seconds, tau."""
    out, seconds = timed(s.target.device, lambda: s.generate(rows, max_new_tokens=max_new_tokens, batch_size=slots))
    return [o.token_ids[0].tolist() for o in out], seconds, out.stats.tau


def _run_peer(
    peer: VllmPeer, rows: list[torch.Tensor], max_new_tokens: int, slots: int
) -> tuple[list[list[int]], float, float]:
    """vLLM over every row with ``slots`` requests in flight (stopping on the stop ids, as ours and
    transformers' runs): outputs, seconds of decoding, tau (new tokens per target forward and row)."""
    outs, seconds, forwards = peer.generate_rows([r.tolist() for r in rows], slots, max_new_tokens)
    return outs, seconds, sum(len(o) for o in outs) / forwards


def _record(repeat: int, batch: int, name: str, outs: list[list[int]], seconds: float, tau: float | None) -> dict:
    """One run's row of the results."""
    new_tokens = sum(len(o) for o in outs)
    return dict(
        repeat=repeat,
        batch=batch,
        variant=name,
        new_tokens=new_tokens,
        seconds=seconds,
        tokens_per_s=new_tokens / seconds,
        tau=tau,
    )


def _mark_identical_rows(records: list[dict], outputs: dict[str, list[list[int]]]) -> None:
    """In each variant's record of one batch size: how many rows equal transformers' and plain's."""
    for rec in records:
        name = rec["variant"]
        rec["rows_identical_to_transformers"] = sum(a == b for a, b in zip(outputs[name], outputs.get(HF, [])))
        rec["rows_identical_to_plain"] = sum(a == b for a, b in zip(outputs[name], outputs.get(PLAIN, [])))


def summarize(records: list[dict]) -> dict:
    """Per batch size and variant: median tokens/s, median ratios to transformers and to plain
    batched decoding (per repeat), tau, and identical rows (of the last repeat)."""
    out: dict = {}
    for batch in sorted({r["batch"] for r in records}):
        sel = [r for r in records if r["batch"] == batch]
        out[batch] = {}
        for name in dict.fromkeys(r["variant"] for r in sel):
            mine = [r for r in sel if r["variant"] == name]
            ratio_hf, ratio_plain = [], []
            for rec in mine:
                peers = {x["variant"]: x for x in sel if x["repeat"] == rec["repeat"]}
                if HF in peers:
                    ratio_hf.append(rec["tokens_per_s"] / peers[HF]["tokens_per_s"])
                if PLAIN in peers:
                    ratio_plain.append(rec["tokens_per_s"] / peers[PLAIN]["tokens_per_s"])
            taus = [r["tau"] for r in mine if r["tau"] is not None]
            out[batch][name] = dict(
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in mine),
                vs_transformers=statistics.median(ratio_hf) if ratio_hf else None,
                vs_plain=statistics.median(ratio_plain) if ratio_plain else None,
                tau=statistics.median(taus) if taus else None,
                rows_identical_to_transformers=mine[-1].get("rows_identical_to_transformers"),
                rows_identical_to_plain=mine[-1].get("rows_identical_to_plain"),
            )
    return out


def format_table(summary: dict, prompts: int) -> str:
    """Markdown: one row per batch size and variant."""
    lines = [
        "| batch | variant | tokens/s | vs transformers | vs plain batched | tau | rows = transformers | rows = plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, f: "" if x is None else f.format(x)  # noqa: E731
    for batch, variants in summary.items():
        for name, m in variants.items():
            lines.append(
                f"| {batch} | {name} | {m['tokens_per_s']:.1f} | {fmt(m['vs_transformers'], '{:.2f}x')} | "
                f"{fmt(m['vs_plain'], '{:.2f}x')} | {fmt(m['tau'], '{:.2f}')} | "
                f"{m['rows_identical_to_transformers']}/{prompts} | {m['rows_identical_to_plain']}/{prompts} |"
            )
    return "\n".join(lines)
