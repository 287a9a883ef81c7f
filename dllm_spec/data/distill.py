"""Self-distillation data: the target's own responses to the project's prompt set.

Responses are generated in large left-padded batches (per-token cost falls steeply with batch size
on CPU), greedy plus sampled variants, and written as gzip'd JSONL shards. Each shard is written
atomically (temporary file + rename) and lists the (prompt id, variant) pairs it holds, so a rerun
skips everything already done: a kill loses at most the shard in flight.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.data.prompts import Prompt
from dllm_spec.jsonl import write_atomic


@dataclass(frozen=True)
class DistillConfig:
    """How responses are generated.

    ``temperatures``: one response per entry per prompt (the entry's index is the record's
    ``variant``); 0.0 means greedy. Work is done variant by variant (every prompt's greedy response
    first), so a partial run holds the most useful responses. ``static_cache`` pre-allocates the KV
    cache (HF's ``cache_implementation="static"``): the default dynamic cache concatenates every
    layer's keys and values at every step, which was two thirds of a batch-64 decode step on CPU;
    the outputs are the same. ``compile``: let HF's generate compile the forward on a GPU, which it
    does by default with a static cache, recompiling for every new batch shape (prompts differ in
    length, so nearly every batch). Off by default; it was not what limits an H100 here, though:
    compiled at batch 512 and eager at batch 1024 both gave ~4,300-4,900 new tokens/s (fp32).
    """

    temperatures: tuple[float, ...] = (0.0, 0.8)
    max_new_tokens: int = 320
    batch_size: int = 32
    shard_size: int = 128
    seed: int = 0
    static_cache: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty tuple of values >= 0, got {self.temperatures}")
        for name in ("max_new_tokens", "batch_size", "shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def iter_shards(directory: str | os.PathLike) -> Iterator[tuple[str, list[dict]]]:
    """Yield (shard name, its records) for every complete shard in ``directory``, in name order."""
    for path in sorted(Path(directory).glob("shard-*.jsonl.gz")):
        with gzip.open(path, "rt") as fh:
            yield path.name.removesuffix(".jsonl.gz"), [json.loads(line) for line in fh]


def read_shards(directory: str | os.PathLike) -> Iterator[dict]:
    """Yield every record of every complete shard in ``directory``."""
    for _, records in iter_shards(directory):
        yield from records


def _done_keys(directory: Path, temperatures: tuple[float, ...]) -> set[tuple[str, int]]:
    """The (prompt id, variant) pairs already in ``directory``; raises if a stored variant was
    generated at another temperature than ``temperatures`` gives it (a rerun with another list)."""
    done = set()
    for r in read_shards(directory):
        v = r["variant"]
        if v < len(temperatures) and r["temperature"] != temperatures[v]:
            raise ValueError(
                f"{directory} holds variant {v} at temperature {r['temperature']}, but the config gives "
                f"variant {v} temperature {temperatures[v]}: keep the stored variants' temperatures first "
                f"in `temperatures` and append new ones"
            )
        done.add((r["prompt_id"], v))
    return done


def write_shard(path: str | os.PathLike, records: list[dict]) -> None:
    """Write ``records`` as a gzip'd JSONL shard, atomically."""
    write_atomic(path, gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))


@torch.inference_mode()
def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    temperature: float,
    max_new_tokens: int,
    seed: int,
    static_cache: bool,
    compile: bool,
) -> list[list[int]]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)  # (N, width), left-padded
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    torch.manual_seed(seed)  # HF generate samples from the global generator
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    kwargs["disable_compile"] = not compile
    out = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs,
    )
    eos = tokenizer.eos_token_id
    responses = []
    for row in out[:, width:].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        responses.append(row)
    return responses


def generate_distillation_data(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    out_dir: str | os.PathLike,
    config: DistillConfig = DistillConfig(),
    max_shards: int | None = None,
) -> Path:
    """Generate (or resume generating) responses for ``prompts`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = _done_keys(out, config.temperatures)
    todo = [(p, v) for v in range(len(config.temperatures)) for p in prompts if (p.id, v) not in done]
    next_index = len(list(out.glob("shard-*.jsonl.gz")))
    bar = tqdm(total=len(todo), desc="distill", unit="resp")
    tokens = 0
    start = time.perf_counter()
    for shard_no, s in enumerate(range(0, len(todo), config.shard_size)):
        if max_shards is not None and shard_no >= max_shards:
            break
        chunk = todo[s: s + config.shard_size]
        records: list[dict] = []
        for variant in range(len(config.temperatures)):
            items = [p for p, v in chunk if v == variant]
            encoded = [
                tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True, tokenize=True, return_dict=False)
                for p in items
            ]
            order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # limit padding
            for b in range(0, len(order), config.batch_size):
                idx = order[b: b + config.batch_size]
                batch_seed = config.seed * 1_000_003 + (next_index + shard_no) * 1009 + variant * 31 + b
                responses = _generate_batch(
                    model, tokenizer, [encoded[i] for i in idx], config.temperatures[variant],
                    config.max_new_tokens, batch_seed, config.static_cache, config.compile,
                )
                for i, response in zip(idx, responses):
                    records.append({
                        "prompt_id": items[i].id, "category": items[i].category, "variant": variant,
                        "temperature": config.temperatures[variant], "prompt_ids": encoded[i], "response_ids": response,
                    })
                    tokens += len(response)
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", tokens=tokens)
        write_shard(out / f"shard-{next_index + shard_no:05d}.jsonl.gz", records)
    bar.close()
    return out
