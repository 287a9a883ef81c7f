"""Self-distillation data: the target's own responses to the project's prompt set, or to real
conversations (:func:`generate_conversation_data`: every user turn of ShareGPT's training
conversations with its real history, through this library's batched engine).

Responses are generated in large left-padded batches (per-token cost falls steeply with batch size
on CPU), greedy plus sampled variants, and written as gzip'd JSONL shards. Each shard is written
atomically (temporary file + rename) and lists the (prompt id, variant) pairs it holds, so a rerun
skips everything already done: a kill loses at most the shard in flight.
"""

from __future__ import annotations

import gzip
import hashlib
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
    stops = stop_ids(model, tokenizer)
    responses = []
    for row in out[:, width:].tolist():  # a row that stopped early is padded after its stop id: cut there
        end = next((i for i, t in enumerate(row) if t in stops), None)
        responses.append(row if end is None else row[: end + 1])
    return responses


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids that end a response: the tokenizer's eos and every id of the model's generation
    config (one id or a list: Qwen2.5 and Llama 3 instruct models stop on several)."""
    ids: set[int] = set()
    for eos in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    return ids


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


# ---- conversations through the library's own engine ---------------------------------------------
@dataclass(frozen=True)
class ConversationDistillConfig:
    """How responses to conversation turns are generated (:func:`generate_conversation_data`).

    ``temperatures``: one response per entry per prompt (the entry's index is the record's
    ``variant``; 0.0 = greedy). ``context_cap``: the most prompt tokens (chat template, history and
    the user turn): the oldest history turns are dropped until it fits, then an over-long user turn
    loses its middle. ``batch_size``: rows decoded at once (continuous batching). ``window``: (prompt,
    variant) pairs per engine call (one call per temperature, greedy first); a call drains its
    batch at the end, so larger windows waste less. ``shard_size``: records per shard (the most a
    kill loses). The order is a hash of (seed, prompt id): stable, a mix of conversations and
    categories from the first shard on, and a prompt's variants are generated together.
    """

    temperatures: tuple[float, ...] = (0.0, 0.8)
    max_new_tokens: int = 1024
    context_cap: int = 1024
    batch_size: int = 32
    shard_size: int = 128
    window: int = 512
    seed: int = 0
    source: str = "sharegpt"

    def __post_init__(self) -> None:
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty tuple of values >= 0, got {self.temperatures}")
        for name in ("max_new_tokens", "context_cap", "batch_size", "shard_size", "window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _template(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode_conversation_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, cap: int) -> tuple[list[int], int, bool]:
    """(prompt ids of at most ``cap`` tokens, history turns dropped, whether the user turn was cut).
    The oldest history turns go first (a user turn together with the assistant turn after it);
    a user turn too long on its own keeps its head and tail."""
    head = [{"role": "system", "content": prompt.system}] if prompt.system is not None else []
    history = [{"role": r, "content": c} for r, c in prompt.history]
    user = {"role": "user", "content": prompt.text}
    dropped = 0
    while True:
        ids = _template(tokenizer, head + history[dropped:] + [user])
        if len(ids) <= cap:
            return ids, dropped, False
        if dropped >= len(history):
            break
        dropped += 2 if dropped + 1 < len(history) and history[dropped]["role"] == "user" else 1
    text = prompt.text
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = len(content) - (len(ids) - cap) - 8
    while budget > 0:
        half = budget // 2
        cut = tokenizer.decode(content[:half]) + "\n[...]\n" + tokenizer.decode(content[len(content) - (budget - half):])
        ids = _template(tokenizer, head + [{"role": "user", "content": cut}])
        if len(ids) <= cap:
            return ids, dropped, True
        budget -= len(ids) - cap + 8
    raise ValueError(f"prompt {prompt.id}: the chat template alone exceeds context_cap={cap}")


def stable_order(key: str) -> int:
    """A stable pseudo-random sort key (and seed source) for a string: the same on every run."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def next_shard_index(out: Path) -> int:
    """The number the next ``shard-NNNNN.jsonl.gz`` in ``out`` takes: one past the highest there."""
    existing = [int(f.name[6:11]) for f in out.glob("shard-*.jsonl.gz") if f.name[6:11].isdigit()]
    return max(existing, default=-1) + 1


def build_engine(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int):
    """This library's engine with no drafter: plain batched decoding with continuous batching."""
    from dllm_spec.config import SpeculatorConfig
    from dllm_spec.drafters import build_drafter
    from dllm_spec.policy import FixedLength
    from dllm_spec.speculator import DiffusionSpeculator

    return DiffusionSpeculator(target, tokenizer, build_drafter("none", target),
                               SpeculatorConfig(max_batch_size=batch_size), policy=FixedLength(0))


def generate_conversation_data(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    out_dir: str | os.PathLike,
    config: ConversationDistillConfig = ConversationDistillConfig(),
    max_shards: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate (or resume generating) the target's responses to ``prompts`` (user turns, each with
    its history) into gzip'd JSONL shards in ``out_dir``, through :class:`DiffusionSpeculator` with
    no drafter. Records: ``prompt_id``, ``conversation_id``, ``turn``, ``source``, ``category``,
    ``variant``, ``temperature``, ``seed``, ``prompt_ids``, ``response_ids`` (with the stop token when
    it stopped there), ``stop_reason``, ``history_turns`` (kept), ``history_dropped``, ``truncated``.
    Returns counters of this run (``records``, ``new_tokens``, ``seconds``, ``tokens_per_s``, ``shards``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = _done_keys(out, config.temperatures)
    ordered = sorted(prompts, key=lambda p: stable_order(f"{config.seed}:{p.id}"))
    todo = [(p, v) for p in ordered for v in range(len(config.temperatures)) if (p.id, v) not in done]
    next_index = next_shard_index(out)
    engine = build_engine(target, tokenizer, config.batch_size)
    stats = dict(records=0, new_tokens=0, shards=0, seconds=0.0, tokens_per_s=0.0, remaining=len(todo))
    bar = tqdm(total=len(todo), desc=f"distill {config.source}", unit="resp", disable=not progress)
    start = time.perf_counter()
    pending: list[dict] = []

    def flush() -> None:
        nonlocal next_index
        write_shard(out / f"shard-{next_index:05d}.jsonl.gz", pending)
        next_index += 1
        stats["shards"] += 1
        pending.clear()

    pos = 0
    while pos < len(todo) and (max_shards is None or stats["shards"] < max_shards):
        size = config.window if max_shards is None else min(config.window, (max_shards - stats["shards"]) * config.shard_size - len(pending))
        window, pos = todo[pos: pos + size], pos + size
        encoded: dict[str, tuple[list[int], int, bool]] = {}
        for p, _ in window:
            if p.id not in encoded:
                encoded[p.id] = encode_conversation_prompt(tokenizer, p, config.context_cap)
        for variant, temperature in enumerate(config.temperatures):
            items = [p for p, v in window if v == variant]
            if not items:
                continue
            seeds = [stable_order(f"{config.seed}:{p.id}:{variant}") % (1 << 31) for p in items]
            for i, output in engine.generate_iter([encoded[p.id][0] for p in items], max_new_tokens=config.max_new_tokens,
                                                  temperature=temperature, seeds=seeds, batch_size=min(config.batch_size, len(items))):
                p = items[i]
                ids, dropped, truncated = encoded[p.id]
                response = output.token_ids[0].tolist()
                conversation, _, turn = p.id.rpartition(":")
                pending.append({
                    "prompt_id": p.id, "conversation_id": conversation.removeprefix(f"{config.source}:"),
                    "turn": int(turn) if turn.isdigit() else 0, "source": config.source, "category": p.category,
                    "variant": variant, "temperature": temperature, "seed": seeds[i], "prompt_ids": ids, "response_ids": response,
                    "stop_reason": output.stats.stop_reason, "history_turns": len(p.history) - dropped,
                    "history_dropped": dropped, "truncated": truncated,
                })
                stats["records"] += 1
                stats["new_tokens"] += len(response)
                bar.update()
                elapsed = time.perf_counter() - start
                bar.set_postfix(tok_s=f"{stats['new_tokens'] / elapsed:.1f}", tokens=stats["new_tokens"])
                if len(pending) >= config.shard_size:
                    flush()
                    if max_shards is not None and stats["shards"] >= max_shards:
                        break
            if max_shards is not None and stats["shards"] >= max_shards:
                break
    if pending and (max_shards is None or stats["shards"] < max_shards):
        flush()
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    stats["tokens_per_s"] = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    stats["remaining"] = len(todo) - stats["records"]
    return stats
