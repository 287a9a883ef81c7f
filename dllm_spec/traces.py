"""Reasoning-trace generation at scale: prompts in, one JSONL record per prompt out.

* Input: JSONL (``id``, ``prompt``, optional ``system``) or plain text (one prompt per line, id =
  line number), parsed by :func:`dllm_spec.prompt.read_prompts`; errors name the line.
* Batched: ``batch_size`` prompts run at once with continuous batching, sorted by length; each
  record is appended the moment its prompt finishes.
* Safe: an output equal to the input or pointing at a directory is refused before any work, the
  output must be writable, a lock keeps two processes off one part file, and every record carries
  its prompt's hash so a resumed record whose prompt changed is reported.
* Resumable: every record is appended with a single write + fsync; on restart a torn last line
  (a kill mid-write) is cut off and ids already complete are skipped, so each prompt ends up
  exactly once.
* Multi-process: under ``accelerate launch --num_processes N -m dllm_spec.traces ...`` process i
  takes prompts i, i+N, ... and writes its own part file; the main process merges the parts into
  the output (input order, every id exactly once) and removes them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from dllm_spec.jsonl import append_record, read_records, write_atomic
from dllm_spec.prompt import Prompt, read_prompts
from dllm_spec.stats import GenerationStats


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part-*"))


def completed_ids(out: Path) -> set[str]:
    done = {r["id"] for r in read_records(out)}
    for part in _parts(out):
        done |= {r["id"] for r in read_records(part)}
    return done


def merge(prompts: list[Prompt], out: Path) -> int:
    """Merge the output and every part file into ``out`` in input order; check each id appears once."""
    by_id: dict[str, dict] = {}
    for source in [out, *_parts(out)]:
        for record in read_records(source):
            by_id.setdefault(record["id"], record)
    missing = [p.id for p in prompts if p.id not in by_id]
    if missing:
        raise RuntimeError(f"merge: {len(missing)} prompts have no trace yet (first: {missing[:3]}); rerun to finish them")
    write_atomic(out, "".join(json.dumps(by_id[p.id], ensure_ascii=False) + "\n" for p in prompts))
    for part in _parts(out):
        part.unlink()
    return len(prompts)


def prompt_hash(prompt: Prompt) -> str:
    """A short hash of what a record was generated from (prompt text and system message)."""
    return hashlib.sha1(json.dumps([prompt.text, prompt.system], ensure_ascii=False).encode()).hexdigest()[:16]


def check_output_path(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is an input file or a directory, and check it is writable, before any work."""
    for src in inputs:
        if out.resolve() == src.resolve() or (src.exists() and out.exists() and os.path.samefile(src, out)):
            raise ValueError(f"--out {out} is the input file: the prompts would be read as finished traces")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.writable-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out} is not writable: {exc.strerror or exc}") from None


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` + ".lock" (two processes never write one part file)."""
    lock = path.with_name(path.name + ".lock")
    fh = open(lock, "a")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{path} is being written by another process (lock {lock} is held)") from None
        yield
    finally:
        fh.close()


def generate_traces(
    spec,
    prompts: list[Prompt],
    out: str | os.PathLike,
    *,
    max_new_tokens: int = 4096,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    config_record: dict | None = None,
    batch_size: int = 1,
    min_new_tokens: int = 0,
    ignore_eos: bool = False,
) -> int:
    """Generate the traces of this process's share of ``prompts`` not yet done, ``batch_size`` at a
    time with continuous batching (prompts sorted by length so prefills pad little); each record is
    appended the moment its prompt finishes. Returns how many it wrote."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.name}.part-{process_index}-of-{num_processes}")
    with locked(part):
        done = {r["id"]: r for r in read_records(out)}
        for other in _parts(out):
            done.update({r["id"]: r for r in read_records(other)})
        mine = [p for i, p in enumerate(prompts) if i % num_processes == process_index]
        for p in mine:
            old = done.get(p.id)
            if old is not None and old.get("prompt_hash") not in (None, prompt_hash(p)):
                print(f"dllm-spec traces: warning: the finished record of id {p.id!r} was generated from a different prompt; "
                      "it is kept (delete it from the output to regenerate)", file=sys.stderr)
        todo = [p for p in mine if p.id not in done]
        if not todo:
            return 0
        encoded = [spec.encode(p.text, system=p.system)[0] for p in todo]
        order = sorted(range(len(todo)), key=lambda i: encoded[i].numel()) if batch_size > 1 else list(range(len(todo)))
        seeds = [seed + int(prompt_hash(todo[i]), 16) % 1_000_000 if temperature > 0 else None for i in order]
        bar = tqdm(total=len(todo), desc=f"traces[{process_index}]", unit="prompt", disable=None, position=process_index)
        totals = GenerationStats()
        written = 0
        started = time.perf_counter()
        for j, result in spec.generate_iter([encoded[i] for i in order], max_new_tokens=max_new_tokens, temperature=temperature,
                                            top_p=top_p, seeds=seeds, batch_size=batch_size, min_new_tokens=min_new_tokens,
                                            ignore_eos=ignore_eos, totals=totals):
            prompt = todo[order[j]]
            s = result.stats
            append_record(part, dict(
                id=prompt.id, prompt=prompt.text, system=prompt.system, prompt_hash=prompt_hash(prompt), text=result.text,
                token_count=s.new_tokens, stop_reason=s.stop_reason,
                stats=dict(tau=s.tau, target_forwards=s.target_forwards, accepted_per_position=s.accepted_per_position,
                           verified_per_position=s.verified_per_position, draft_time_s=s.draft_time_s,
                           verify_time_s=s.verify_time_s, wall_time_s=s.wall_time_s),
                config=dict(config_record or {}, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            batch_size=batch_size, min_new_tokens=min_new_tokens, ignore_eos=ignore_eos),
            ))
            written += 1
            bar.update()
            bar.set_postfix(tok_s=f"{totals.new_tokens / max(time.perf_counter() - started, 1e-9):.1f}",
                            tau=f"{totals.tau:.2f}")
        bar.close()
        return written


def auto_batch_size(device) -> int:
    """The batch ``traces`` runs by default: 16 rows on a CPU (plain batched decoding there is
    ~1.5x transformers' batched generate at 16 rows, and the cost-aware policy drafts only where it
    pays), 64 on a GPU."""
    import torch

    return 64 if torch.device(device).type == "cuda" else 16


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dllm-spec traces", description="Generate reasoning traces (resumable, multi-process, batched).")
    parser.add_argument("input", help="JSONL (id, prompt, optional system) or text, one prompt per line")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--target", default=None)
    parser.add_argument("--drafter", default=None)
    parser.add_argument("--policy", default="adaptive")
    parser.add_argument("--block-size", type=_positive_int, default=16)
    parser.add_argument("--batch-size", default="auto", help="rows generated at once (continuous batching); auto: 16 on CPU, 64 on GPU")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernels", default="auto", choices=["auto", "packed", "default"])
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=4096)
    parser.add_argument("--min-new-tokens", type=int, default=0, help="suppress stop ids until this many new tokens")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (long-output studies)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        from dllm_spec.speculator import check_generation_args

        check_generation_args(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=args.top_p,
                              seed=args.seed, min_new_tokens=args.min_new_tokens)
        batch_size = None if args.batch_size == "auto" else _positive_int(args.batch_size)
        out = Path(args.out)
        check_output_path(out, [Path(args.input)])
        prompts = read_prompts(args.input)
        from accelerate import PartialState

        from dllm_spec import DiffusionSpeculator, SpeculatorConfig
        from dllm_spec.policy import build_policy
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        state = PartialState()
        batch_size = batch_size or auto_batch_size(state.device)
        spec = DiffusionSpeculator.from_pretrained(
            args.target, drafter=args.drafter, dtype=args.dtype, device=state.device, kernels=args.kernels,
            config=SpeculatorConfig(block_size=args.block_size, max_batch_size=max(64, batch_size)),
            policy=build_policy(args.policy, args.block_size),
        )
        config_record = dict(target=args.target or "SmolLM2-135M-Instruct (embedded)", drafter=spec.drafter.name,
                             policy=args.policy, block_size=args.block_size, dtype=str(spec.target.dtype))
        generate_traces(spec, prompts, out, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, process_index=state.process_index,
                        num_processes=state.num_processes, config_record=config_record, batch_size=batch_size,
                        min_new_tokens=args.min_new_tokens, ignore_eos=args.ignore_eos)
        state.wait_for_everyone()
        if state.is_main_process:
            n = merge(prompts, out)
            print(f"{n} traces in {args.out}", file=sys.stderr)
    except (ValueError, FileNotFoundError, argparse.ArgumentTypeError, RuntimeError) as exc:
        print(f"dllm-spec traces: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
