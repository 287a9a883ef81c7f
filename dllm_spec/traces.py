"""Reasoning-trace generation at scale: prompts in, one JSONL record per prompt out.

* Input: JSONL (``id``, ``prompt``, optional ``system``) or plain text (one prompt per line, id =
  line number). Malformed lines, missing prompts and duplicate ids are errors naming the line.
* Resumable: every record is appended with a single write + fsync; on restart a torn last line
  (a kill mid-write) is cut off and ids already complete are skipped, so each prompt ends up
  exactly once.
* Multi-process: under ``accelerate launch --num_processes N -m dllm_spec.traces ...`` process i
  takes prompts i, i+N, ... and writes its own part file; the main process merges the parts into
  the output (input order, every id exactly once) and removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dllm_spec.jsonl import append_record, read_records, write_atomic


@dataclass(frozen=True)
class TracePrompt:
    id: str
    prompt: str
    system: str | None = None
    category: str = "all"


def read_prompts(path: str | os.PathLike) -> list[TracePrompt]:
    """Parse a JSONL (``id``, ``prompt``, optional ``system`` and ``category``) or plain-text prompt
    file; errors name the file and line. The one prompt-file parser (bench and study use it too)."""
    prompts: list[TracePrompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{n}: missing or empty 'prompt'")
            pid = str(record.get("id", n))
            system = record.get("system")
            category = str(record.get("category", "all"))
        else:
            pid, prompt, system, category = str(n), line, None, "all"
        if pid in seen:
            raise ValueError(f"{path}:{n}: duplicate id {pid!r} (first seen on line {seen[pid]})")
        seen[pid] = n
        prompts.append(TracePrompt(pid, prompt, system, category))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part-*"))


def completed_ids(out: Path) -> set[str]:
    done = {r["id"] for r in read_records(out)}
    for part in _parts(out):
        done |= {r["id"] for r in read_records(part)}
    return done


def merge(prompts: list[TracePrompt], out: Path) -> int:
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


def generate_traces(
    spec,
    prompts: list[TracePrompt],
    out: str | os.PathLike,
    *,
    max_new_tokens: int = 4096,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    config_record: dict | None = None,
) -> int:
    """Generate the traces of this process's share of ``prompts`` not yet done. Returns how many it wrote."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = completed_ids(out)
    mine = [p for i, p in enumerate(prompts) if i % num_processes == process_index and p.id not in done]
    part = out.with_name(f"{out.name}.part-{process_index}-of-{num_processes}")
    bar = tqdm(mine, desc=f"traces[{process_index}]", unit="prompt", disable=None, position=process_index)
    tokens = forwards = 0
    seconds = 0.0
    for prompt in bar:
        result = spec.generate(prompt.prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed + abs(hash(prompt.id)) % 1_000_000 if temperature > 0 else None, system=prompt.system)
        s = result.stats
        append_record(part, dict(
            id=prompt.id, prompt=prompt.prompt, system=prompt.system, text=result.text, token_count=s.new_tokens,
            stop_reason=s.stop_reason,
            stats=dict(tau=s.tau, target_forwards=s.target_forwards, accepted_per_position=s.accepted_per_position,
                       verified_per_position=s.verified_per_position, draft_time_s=s.draft_time_s,
                       verify_time_s=s.verify_time_s, wall_time_s=s.wall_time_s),
            config=dict(config_record or {}, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
        ))
        tokens += s.new_tokens
        forwards += s.target_forwards
        seconds += s.wall_time_s
        bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.1f}", tau=f"{tokens / max(forwards, 1):.2f}")
    return len(mine)


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dllm-spec traces", description="Generate reasoning traces (resumable, multi-process).")
    parser.add_argument("input", help="JSONL (id, prompt, optional system) or text, one prompt per line")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--target", default=None)
    parser.add_argument("--drafter", default=None)
    parser.add_argument("--policy", default="adaptive")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        prompts = read_prompts(args.input)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dllm-spec traces: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from accelerate import PartialState

    from dllm_spec import DiffusionSpeculator, SpeculatorConfig
    from dllm_spec.policy import build_policy

    state = PartialState()
    spec = DiffusionSpeculator.from_pretrained(
        args.target, drafter=args.drafter, dtype=args.dtype, device=state.device,
        config=SpeculatorConfig(block_size=args.block_size), policy=build_policy(args.policy, args.block_size),
    )
    config_record = dict(target=args.target or "SmolLM2-135M-Instruct (embedded)", drafter=spec.drafter.name,
                         policy=args.policy, block_size=args.block_size, dtype=str(spec.target.dtype))
    generate_traces(spec, prompts, args.out, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, process_index=state.process_index,
                    num_processes=state.num_processes, config_record=config_record)
    state.wait_for_everyone()
    if state.is_main_process:
        n = merge(prompts, Path(args.out))
        print(f"{n} traces in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
