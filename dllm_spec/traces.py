"""Reasoning-trace generation at scale: prompts in, one JSONL record per prompt and sample out.

* Samples: ``num_samples`` N > 1 (temperature > 0) writes N records per prompt, ``sample`` 0..N-1,
  each with its own ``seed`` (derived from ``--seed``, the prompt and the sample index, and
  recorded): ``generate(prompt, temperature=T, top_p=P, seed=record["seed"])`` re-generates it
  exactly in reproducible sampling. The samples of a prompt share one prefill. Resume works per
  (id, sample).

* Input: JSONL (``id``, ``prompt``, optional ``system``) or plain text (one prompt per line, id =
  line number), parsed by :func:`dllm_spec.prompt.read_prompts`; errors name the line.
* Batched: ``batch_size`` prompts run at once with continuous batching, sorted by length; each
  record is appended the moment its prompt finishes.
* Safe: an output equal to the input, a directory, a device or any other non-regular file, or an
  existing file that is not a traces file is refused (and left untouched) before any work; the
  output must be writable, a lock keeps two processes off one part file, and every record carries
  its prompt's hash so a resumed record whose prompt changed is reported.
* Nothing lost: the final merge keeps every record already in the output (other prompt files'
  ids included) and adds the new ones; only this output's own part files are merged and removed
  (their names are matched literally: glob characters in ``--out`` are plain characters).
* Bad prompts are named: a prompt that is too long for the model, or whose ``system`` is not a
  string, stops the run before any generation with an error naming its id and input line (fix or
  remove it and rerun; nothing is skipped silently).
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
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from dllm_spec.jsonl import append_record, read_records, write_atomic
from dllm_spec.prompt import Prompt, read_prompts
from dllm_spec.stats import GenerationStats

if TYPE_CHECKING:
    import torch


def _parts(out: Path) -> list[Path]:
    """This output's part files (``<out>.part-I-of-N``), matched literally: no glob, so ``a?.jsonl``
    never takes ``ab.jsonl``'s parts and ``run[1].jsonl`` finds its own."""
    pattern = re.compile(re.escape(out.name) + r"\.part-\d+-of-\d+")
    try:
        names = os.listdir(out.parent if str(out.parent) else ".")
    except FileNotFoundError:
        return []
    return sorted(out.parent / name for name in names if pattern.fullmatch(name))


def read_traces(out: Path) -> list[dict]:
    """The records of an existing output, read without changing it; ValueError (the file left
    untouched) when it is not a traces file: every line a JSON record with an ``id`` and a ``text``,
    the last one complete (this module writes an output only whole, by an atomic rename). A
    directory, a device or any other non-regular file is refused too."""
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} is not a regular file (a directory, a device, a pipe, ...): give a file path")
    if not out.is_file():
        return []
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        raise ValueError(
            f"--out {out} is not a traces file (its last line is incomplete); it is left untouched: "
            "give a new path or an earlier traces output"
        )
    records = []
    for n, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or "text" not in record:
            raise ValueError(
                f"--out {out} is not a traces file (line {n} is not a trace record with an 'id' and a 'text'); "
                "it is left untouched: give a new path or an earlier traces output"
            )
        records.append(record)
    return records


def record_key(record: dict) -> tuple[str, int]:
    """(id, sample) of a trace record (records written before samples existed are sample 0)."""
    return record["id"], int(record.get("sample", 0))


def completed_ids(out: Path) -> set[tuple[str, int]]:
    """The (id, sample) pairs with a record in ``out`` or in its part files."""
    done = {record_key(r) for r in read_traces(out)}
    for part in _parts(out):
        done |= {record_key(r) for r in read_records(part, repair=False)}
    return done


def merge(prompts: list[Prompt], out: Path, num_samples: int = 1) -> int:
    """Merge this output's part files into ``out``: every record already in ``out`` stays (in its
    place, whatever prompt file it came from), then the new records follow in input order (samples
    in order); checks every (prompt, sample) has a record. A part another process is still writing
    (its lock held) is left alone. Returns the number of records now in ``out``."""
    kept = read_traces(out)
    have = {record_key(r) for r in kept}
    new: dict[tuple[str, int], dict] = {}
    merged: list[Path] = []
    with contextlib.ExitStack() as stack:
        for part in _parts(out):
            try:
                stack.enter_context(locked(part))
            except ValueError:
                continue  # another job is writing it
            merged.append(part)
            for record in read_records(part, repair=False):
                if record_key(record) not in have:
                    new.setdefault(record_key(record), record)
        wanted = [(p.id, j) for p in prompts for j in range(num_samples)]
        missing = [k for k in wanted if k not in have and k not in new]
        if missing:
            raise RuntimeError(
                f"merge: {len(missing)} (prompt, sample) pairs have no trace yet (first: {missing[:3]}); "
                "rerun to finish them"
            )
        wanted_set = set(wanted)
        others = [r for k, r in new.items() if k not in wanted_set]  # parts of an earlier run with another prompt file
        order = kept + [new[k] for k in wanted if k in new] + others
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in order))
        for part in merged:  # merged: the part and its lock file go (the lock is still held)
            part.unlink()
            part.with_name(part.name + ".lock").unlink(missing_ok=True)
    return len(order)


def sample_seed(seed: int, prompt: Prompt, sample: int) -> int:
    """The recorded seed of one sample: a hash of (--seed, the prompt, the sample index), < 2**63."""
    return int(hashlib.sha1(f"{seed}:{prompt_hash(prompt)}:{sample}".encode()).hexdigest()[:15], 16)


def prompt_hash(prompt: Prompt) -> str:
    """A short hash of what a record was generated from (prompt text and system message)."""
    return hashlib.sha1(json.dumps([prompt.text, prompt.system], ensure_ascii=False).encode()).hexdigest()[:16]


def check_output_path(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is an input file, a directory, a device or other non-regular file, or
    an existing file that is not a traces file, and check it is writable, before any work."""
    for src in inputs:
        if out.resolve() == src.resolve() or (src.exists() and out.exists() and os.path.samefile(src, out)):
            raise ValueError(f"--out {out} is the input file: the prompts would be read as finished traces")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file path")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} is not a regular file (a device, a pipe, ...): give a file path")
    read_traces(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.writable-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out} is not writable: {exc.strerror or exc}") from None


def check_prompts(prompts: list[Prompt], source: str | os.PathLike | None = None) -> None:
    """Refuse a prompt whose ``system`` message is not a string, naming its id and input line."""
    for p in prompts:
        if p.system is not None and not isinstance(p.system, str):
            raise ValueError(f"{_where(p, source)}: 'system' must be a string, got {p.system!r}")


def _where(prompt: Prompt, source: str | os.PathLike | None) -> str:
    """``FILE:LINE: prompt id 'ID'`` (the line found by the id; just the id without a source)."""
    if source is None:
        return f"prompt id {prompt.id!r}"
    try:
        lines = Path(source).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line) if line.lstrip().startswith("{") else None
        except json.JSONDecodeError:
            record = None
        if (isinstance(record, dict) and str(record.get("id", n)) == prompt.id) or (
            record is None and str(n) == prompt.id
        ):
            return f"{source}:{n}: prompt id {prompt.id!r}"
    return f"{source}: prompt id {prompt.id!r}"


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
    source: str | os.PathLike | None = None,
    num_samples: int = 1,
    sampling: str = "reproducible",
) -> int:
    """Generate the traces of this process's share of ``prompts`` not yet done, ``batch_size`` rows
    at a time with continuous batching (prompts sorted by length so prefills pad little; a prompt's
    samples side by side, so they share its prefill); each record is appended the moment it
    finishes. Returns how many it wrote. ``source`` (the prompt file) lets errors name a bad
    prompt's line; a prompt too long for the model stops the run before any generation."""
    if num_samples > 1 and temperature == 0:
        raise ValueError("--num-samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    read_traces(out)  # refuses a file that is not a traces file before anything is written beside it
    check_prompts(prompts, source)
    part = out.with_name(f"{out.name}.part-{process_index}-of-{num_processes}")
    with locked(part):
        todo = _todo(out, part, prompts, process_index, num_processes, num_samples)
        if not todo:
            return 0
        encoded = _encode(spec, list({id(p): p for p, _ in todo}.values()), source)  # todo is in input order
        order = (
            sorted(range(len(todo)), key=lambda i: encoded[id(todo[i][0])].numel())
            if batch_size > 1
            else list(range(len(todo)))
        )
        config = dict(
            config_record or {},
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            min_new_tokens=min_new_tokens,
            ignore_eos=ignore_eos,
            num_samples=num_samples,
            sampling=sampling,
        )
        jobs = [(*todo[i], encoded[id(todo[i][0])]) for i in order]
        return _write_traces(spec, part, jobs, config, process_index)


def _todo(
    out: Path, part: Path, prompts: list[Prompt], process_index: int, num_processes: int, num_samples: int
) -> list[tuple[Prompt, int]]:
    """This process's (prompt, sample) pairs that neither ``out`` nor a part file holds yet, in input
    order (only this process's own part file is repaired when its last line is torn)."""
    done = {record_key(r): r for r in read_traces(out)}
    for other in _parts(out):
        done.update({record_key(r): r for r in read_records(other, repair=other == part)})
    mine = [p for i, p in enumerate(prompts) if i % num_processes == process_index]
    _warn_changed(mine, done)
    return [(p, j) for p in mine for j in range(num_samples) if (p.id, j) not in done]


#: the keys of a traces config that are ``generate_iter``'s arguments
_GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "batch_size", "min_new_tokens", "ignore_eos", "sampling")


def _write_traces(
    spec, part: Path, jobs: list[tuple[Prompt, int, torch.Tensor]], config: dict, process_index: int
) -> int:
    """Generate ``jobs`` (prompt, sample, encoded prompt), in this order, with continuous batching,
    appending each record to ``part`` the moment it finishes; returns how many it wrote."""
    sampled = config["temperature"] > 0
    seeds = [sample_seed(config["seed"], prompt, sample) if sampled else None for prompt, sample, _ in jobs]
    bar = tqdm(total=len(jobs), desc=f"traces[{process_index}]", unit="trace", disable=None, position=process_index)
    totals = GenerationStats()
    written = 0
    started = time.perf_counter()
    for j, result in spec.generate_iter(
        [ids for _, _, ids in jobs], seeds=seeds, totals=totals, **{k: config[k] for k in _GENERATE_KEYS}
    ):
        prompt, sample, _ = jobs[j]
        _append(part, _trace_record(prompt, sample, result, config, sampled))
        written += 1
        bar.update()
        bar.set_postfix(
            tok_s=f"{totals.new_tokens / max(time.perf_counter() - started, 1e-9):.1f}", tau=f"{totals.tau:.2f}"
        )
    bar.close()
    return written


def _trace_record(prompt: Prompt, sample: int, result, config: dict, sampled: bool) -> dict:
    """One output record: the prompt, the sample and its seed, the text, and the run's stats."""
    s = result.stats
    stats = dict(
        tau=s.tau,
        target_forwards=s.target_forwards,
        accepted_per_position=s.accepted_per_position,
        verified_per_position=s.verified_per_position,
        draft_time_s=s.draft_time_s,
        verify_time_s=s.verify_time_s,
        wall_time_s=s.wall_time_s,
    )
    return dict(
        id=prompt.id,
        sample=sample,
        seed=s.seed if sampled else None,
        prompt=prompt.text,
        system=prompt.system,
        prompt_hash=prompt_hash(prompt),
        text=result.text,
        token_count=s.new_tokens,
        stop_reason=s.stop_reason,
        stats=stats,
        config=config,
    )


def _warn_changed(prompts: list[Prompt], done: dict[tuple[str, int], dict]) -> None:
    """Say when a finished record of one of ``prompts`` was generated from a different prompt text."""
    for p in prompts:
        old = done.get((p.id, 0))
        if old is not None and old.get("prompt_hash") not in (None, prompt_hash(p)):
            print(
                f"dllm-spec traces: warning: the finished record of id {p.id!r} was generated from a different prompt; "
                "it is kept (delete it from the output to regenerate)",
                file=sys.stderr,
            )


def _encode(spec, prompts: list[Prompt], source) -> dict[int, "object"]:
    """Each prompt's ids (one tensor per prompt, shared by its samples), keyed by ``id(prompt)``;
    an encoding error names the prompt's id and line."""
    encoded = {}
    for p in prompts:
        try:
            encoded[id(p)] = spec.encode(p.text, system=p.system)[0]
        except ValueError as exc:
            raise ValueError(f"{_where(p, source)}: {exc}") from None
    return encoded


def _append(part: Path, record: dict) -> None:
    """Append one record; a failed write (a full disk) names the file and says nothing is lost."""
    try:
        append_record(part, record)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot write {part}: {exc.strerror or exc}; the traces finished so far are kept, rerun to resume",
        ) from None


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
    parser = argparse.ArgumentParser(
        prog="dllm-spec traces", description="Generate reasoning traces (resumable, multi-process, batched)."
    )
    parser.add_argument("input", help="JSONL (id, prompt, optional system) or text, one prompt per line")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--target", default=None)
    parser.add_argument("--drafter", default=None)
    parser.add_argument("--policy", default="adaptive")
    parser.add_argument("--block-size", type=_positive_int, default=16)
    parser.add_argument(
        "--batch-size", default="auto", help="rows generated at once (continuous batching); auto: 16 on CPU, 64 on GPU"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernels", default="auto", choices=["auto", "packed", "default"])
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=4096)
    parser.add_argument("--min-new-tokens", type=int, default=0, help="suppress stop ids until this many new tokens")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (long-output studies)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1,
        help="samples per prompt (temperature > 0), each with its own recorded seed; one prefill per prompt",
    )
    parser.add_argument(
        "--sampling",
        default="reproducible",
        choices=["reproducible", "speculative"],
        help="reproducible: a recorded seed re-generates its trace exactly, whatever the drafter or batch",
    )
    from dllm_spec.cli_errors import check_argv, exits_cleanly

    argv = list(argv) if argv is not None else sys.argv[1:]
    errors = (ValueError, OSError, argparse.ArgumentTypeError, RuntimeError)
    with exits_cleanly("dllm-spec traces", errors):
        check_argv(argv)
    args = parser.parse_args(argv)
    with exits_cleanly("dllm-spec traces", errors):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    """``traces`` after parsing: check everything, load the model, generate, merge."""
    from dllm_spec.speculator import check_generation_args

    check_generation_args(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=0,
        top_p=args.top_p,
        seed=args.seed,
        min_new_tokens=args.min_new_tokens,
        sampling=args.sampling,
    )
    if args.num_samples > 1 and args.temperature == 0:
        raise ValueError("--num-samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    batch_size = None if args.batch_size == "auto" else _positive_int(args.batch_size)
    out = Path(args.out)
    check_output_path(out, [Path(args.input)])
    prompts = read_prompts(args.input)
    check_prompts(prompts, args.input)
    from accelerate import PartialState

    from dllm_spec import DiffusionSpeculator, SpeculatorConfig
    from dllm_spec.policy import build_policy

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    state = PartialState()
    batch_size = batch_size or auto_batch_size(state.device)
    spec = DiffusionSpeculator.from_pretrained(
        args.target,
        drafter=args.drafter,
        dtype=args.dtype,
        device=state.device,
        kernels=args.kernels,
        config=SpeculatorConfig(block_size=args.block_size, max_batch_size=max(64, batch_size)),
        policy=build_policy(args.policy, args.block_size),
    )
    config_record = dict(
        target=args.target or "SmolLM2-135M-Instruct (embedded)",
        drafter=spec.drafter.name,
        policy=args.policy,
        block_size=args.block_size,
        dtype=str(spec.target.dtype),
    )
    generate_traces(
        spec,
        prompts,
        out,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        process_index=state.process_index,
        num_processes=state.num_processes,
        config_record=config_record,
        batch_size=batch_size,
        min_new_tokens=args.min_new_tokens,
        ignore_eos=args.ignore_eos,
        source=args.input,
        num_samples=args.num_samples,
        sampling=args.sampling,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        n = merge(prompts, out, args.num_samples)
        print(f"{n} traces in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
