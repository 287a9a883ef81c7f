"""Off-policy training text: ShareGPT's own assistant turns (written by other models), tokenized
as the target's chat template would hold them, in the shard layout of the distillation data.

The records carry no target output: training labels them with the target's own top-k next-token
distribution at every position (:class:`~dllm_spec.training.features.TeacherStore`, one forward
over the text, about five times cheaper per token than generating it) and treats them as
off-policy (``temperature`` is ``None``; the drafter learns what the target would say there, not
the text's own next token). No generation is involved, so a shard costs only tokenization.

Each record: ``prompt_id`` (``sharegpt:<conversation>:<turn>``, the user turn it answers),
``conversation_id``, ``turn``, ``source`` (``sharegpt-text``), ``category``, ``variant`` (0),
``temperature`` (``None``), ``prompt_ids`` (system, real history and the user turn through the chat
template, at most ``context_cap`` tokens, oldest history first to go), ``response_ids`` (the
assistant turn, at most ``max_response_tokens``, ending with the stop token when it fits),
``stop_reason`` (``eos`` or ``length``), ``history_turns``, ``history_dropped``, ``truncated``.
Shards are written atomically and resumed by prompt id, like the generated data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dllm_spec.data.distill import (
    encode_conversation_prompt,
    next_shard_index,
    read_shards,
    stable_order,
    write_shard,
)
from dllm_spec.data.sharegpt import Conversation

SOURCE = "sharegpt-text"


@dataclass(frozen=True)
class TextDataConfig:
    """How assistant turns become records: ``context_cap`` prompt tokens at most,
    ``max_response_tokens`` per response, ``shard_size`` records per shard, ``max_tokens`` response
    tokens in all (0: every turn), the turn order a hash of (``seed``, prompt id)."""

    context_cap: int = 512
    max_response_tokens: int = 1024
    shard_size: int = 128
    max_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("context_cap", "max_response_tokens", "shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0: no limit), got {self.max_tokens}")


def assistant_turns(conversations: list[Conversation]) -> list[tuple[Conversation, int, str]]:
    """(conversation, user turn number, the assistant reply to it) for every user turn that an
    assistant turn answers directly."""
    out = []
    for c in conversations:
        for n, index in enumerate(c.user_turns()):
            if index + 1 < len(c.turns) and c.turns[index + 1][0] == "assistant":
                out.append((c, n, c.turns[index + 1][1]))
    return out


def text_record(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, turn: int, reply: str, config: TextDataConfig
) -> dict | None:
    """One off-policy record (module docstring), or None when the reply tokenizes to nothing."""
    prompt = conversation.prompt(turn)
    ids, dropped, truncated = encode_conversation_prompt(tokenizer, prompt, config.context_cap)
    response = list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    if not response:
        return None
    stop = "length" if len(response) >= config.max_response_tokens else "eos"
    response = response[: config.max_response_tokens]
    if stop == "eos" and tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    return {
        "prompt_id": prompt.id, "conversation_id": conversation.id, "turn": turn, "source": SOURCE,
        "category": conversation.category, "variant": 0, "temperature": None, "prompt_ids": ids,
        "response_ids": response, "stop_reason": stop, "history_turns": len(prompt.history) - dropped,
        "history_dropped": dropped, "truncated": truncated,
    }  # fmt: skip


def write_text_data(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    out_dir: str | os.PathLike,
    config: TextDataConfig = TextDataConfig(),
    progress: bool = True,
) -> dict:
    """Write (or resume writing) the assistant turns of ``conversations`` as off-policy shards in
    ``out_dir``; stops once ``config.max_tokens`` response tokens are there (counting earlier
    shards). Returns this call's counters: ``records``, ``tokens``, ``shards``, ``skipped`` (empty
    replies), ``total_tokens`` (in ``out_dir`` now)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done, have = _done(out)
    turns = sorted(assistant_turns(conversations), key=lambda t: stable_order(f"{config.seed}:sharegpt:{t[0].id}:{t[1]}"))
    index = next_shard_index(out)
    stats = dict(records=0, tokens=0, shards=0, skipped=0)
    pending: list[dict] = []
    bar = tqdm(total=config.max_tokens or None, initial=have, desc="sharegpt text", unit="tok", disable=not progress)
    for conversation, turn, reply in turns:
        if config.max_tokens and have + stats["tokens"] >= config.max_tokens:
            break
        if f"sharegpt:{conversation.id}:{turn}" in done:
            continue
        record = text_record(tokenizer, conversation, turn, reply, config)
        if record is None:
            stats["skipped"] += 1
            continue
        pending.append(record)
        stats["records"] += 1
        stats["tokens"] += len(record["response_ids"])
        bar.update(len(record["response_ids"]))
        if len(pending) >= config.shard_size:
            write_shard(out / f"shard-{index:05d}.jsonl.gz", pending)
            index, stats["shards"] = index + 1, stats["shards"] + 1
            pending = []
    if pending:
        write_shard(out / f"shard-{index:05d}.jsonl.gz", pending)
        stats["shards"] += 1
    bar.close()
    stats["total_tokens"] = have + stats["tokens"]
    return stats


def _done(out: Path) -> tuple[set[str], int]:
    """The prompt ids already written in ``out`` and their response tokens; refuses a directory
    that holds generated (on-policy) records, so the two kinds never share one."""
    done, tokens = set(), 0
    for r in read_shards(out):
        if r.get("source") != SOURCE:
            raise ValueError(
                f"{out} holds records of source {r.get('source')!r}: write {SOURCE} records to their own directory"
            )
        done.add(r["prompt_id"])
        tokens += len(r["response_ids"])
    return done, tokens
