"""Throughput benchmark over a prompt set at several batch sizes, in one run, interleaved: transformers'
batched greedy ``generate`` (left padding, the prompts in order, ``batch`` at a time), plain batched
decoding in our loop (the same continuous-batching path with a drafter that proposes nothing), and
each speculative variant. Reports new tokens per second, ratios, tau and whether the greedy outputs
agree row by row (ratios, not absolute times, are what carries between machines)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

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
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
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
        for seq in out[:, width:].tolist():
            cut = next((k + 1 for k, t in enumerate(seq) if t in stop_ids), len(seq))
            outputs.append(seq[:cut])
    return outputs, time.perf_counter() - start


def run_throughput(
    spec: DiffusionSpeculator,
    variants: dict[str, DiffusionSpeculator],
    prompts: list[str],
    batch_sizes: list[int],
    max_new_tokens: int = 256,
    repeats: int = 1,
    hf_model: PreTrainedModel | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Every (batch size, variant) ``repeats`` times, variants interleaved and rotated per repeat.

    ``variants``: label -> speculator over ``spec``'s target (plain batched decoding is added as
    ``"plain"``); ``hf_model``: the model transformers' ``generate`` runs (default: ``spec.target``;
    pass an unpacked copy to compare against stock transformers kernels). ``on_result`` receives the
    partial result after every run (write it out: a crash keeps what finished).
    """
    if not prompts:
        raise ValueError("the throughput benchmark needs at least one prompt")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive, got {batch_sizes}")
    hf_model = hf_model or spec.target
    rows = [spec.encode(p)[0].cpu() for p in prompts]
    stop_ids = spec._stop_ids(None)
    plain = DiffusionSpeculator(spec.target, spec.tokenizer, NullDrafter(), spec.config, policy=FixedLength(0))
    ours = {PLAIN: plain, **variants}
    names = [HF, *ours]
    records: list[dict] = []
    result = dict(
        config=dict(
            max_new_tokens=max_new_tokens,
            repeats=repeats,
            prompts=len(prompts),
            batch_sizes=batch_sizes,
            dtype=str(spec.target.dtype),
            device=str(spec.target.device),
            threads=torch.get_num_threads(),
            kernels=getattr(spec.target, "dllm_kernels", "default"),
            hf_kernels=getattr(hf_model, "dllm_kernels", "default"),
        ),
        records=records,
    )
    for name, s in ours.items():  # warm-up, and the latency curves of every batch size
        s.generate(prompts[: max(batch_sizes)], max_new_tokens=4, batch_size=min(max(batch_sizes), len(prompts)))
    hf_generate(hf_model, spec.tokenizer, rows[:1], 1, 4, stop_ids)
    bar = tqdm(total=repeats * len(batch_sizes) * len(names), desc="throughput", unit="run")
    for r in range(repeats):
        for batch in batch_sizes:
            slots = min(batch, len(prompts))
            order = names[r % len(names) :] + names[: r % len(names)]
            outputs: dict[str, list[list[int]]] = {}
            for name in order:
                if name == HF:
                    outs, seconds = hf_generate(hf_model, spec.tokenizer, rows, slots, max_new_tokens, stop_ids)
                    tau = None
                else:
                    start = time.perf_counter()
                    out = ours[name].generate(rows, max_new_tokens=max_new_tokens, batch_size=slots)
                    seconds = time.perf_counter() - start
                    outs = [o.token_ids[0].tolist() for o in out]
                    tau = out.stats.tau
                outputs[name] = outs
                records.append(
                    dict(
                        repeat=r,
                        batch=batch,
                        variant=name,
                        new_tokens=sum(len(o) for o in outs),
                        seconds=seconds,
                        tokens_per_s=sum(len(o) for o in outs) / seconds,
                        tau=tau,
                    )
                )
                bar.update()
            for name in names:
                rec = next(x for x in records[-len(names) :] if x["variant"] == name)
                rec["rows_identical_to_transformers"] = sum(a == b for a, b in zip(outputs[name], outputs[HF]))
                rec["rows_identical_to_plain"] = sum(a == b for a, b in zip(outputs[name], outputs[PLAIN]))
            result["summary"] = summarize(records)
            if on_result is not None:
                on_result(result)
    bar.close()
    result["summary"] = summarize(records)
    return result


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
