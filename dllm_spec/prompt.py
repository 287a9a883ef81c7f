"""Prompts: the prompt-set type and prompt-file parser (shared by the prompt set, traces, bench and
study), and the encoder that turns what a user passes to ``generate`` into token ids."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

#: share of the project's prompt set held out from training (by a hash of the prompt text)
HELDOUT_FRACTION = 0.03


@dataclass(frozen=True)
class Prompt:
    """One user prompt: ``id``, ``category`` (for per-category reports), ``text``, optional ``system``
    and optional chat ``history``: the conversation's earlier turns as ``(role, content)`` pairs
    (``user``/``assistant``), oldest first, that come before ``text`` (a later turn of a conversation)."""

    id: str
    category: str
    text: str
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat messages: the system message (if any), the history, then the user's ``text``."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": r, "content": c} for r, c in self.history] + [{"role": "user", "content": self.text}]

    @property
    def generate_input(self) -> str | list[dict[str, str]]:
        """What to hand ``DiffusionSpeculator.generate``/``encode``: the plain ``text`` for a lone user
        turn, the chat :attr:`messages` when there is a history or a system message."""
        return self.messages if self.history or self.system is not None else self.text

    @property
    def split(self) -> str:
        """``heldout`` or ``train``: a hash of the text, so it never changes when a prompt set grows."""
        digest = int(hashlib.sha1(self.text.encode()).hexdigest()[:8], 16)
        return "heldout" if digest / 0xFFFFFFFF < HELDOUT_FRACTION else "train"


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Parse a JSONL (``id``, ``prompt``, optional ``system`` and ``category``) or plain-text prompt
    file (one prompt per line, id = line number); errors name the file and line."""
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the prompt file {path}: {exc}") from None
    for n, line in enumerate(text.splitlines(), start=1):
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
        prompts.append(Prompt(pid, category, prompt, system))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


#: what ``DiffusionSpeculator.generate`` takes as one prompt: text, chat messages, ids or input_ids (1, T)
PromptInput = str | list | torch.Tensor


class PromptEncoder:
    """Turns user prompts into token ids for one target: chat templates, raw text, id lists and
    input_ids (with padding masks), checked against the target's vocabulary and context."""

    def __init__(self, tokenizer, vocab_size: int, context_limit: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_limit = context_limit

    def encode(self, prompt: PromptInput, chat: bool | None = None, system: str | None = None) -> torch.Tensor:
        """Token ids (1, T) (on the CPU) for ONE prompt. Strings (and message lists) go through the chat template
        when the tokenizer has one (``chat=None``/``True``); ``chat=False`` sends raw text. A tensor
        (1, T) or (T,), or a list of ints, is used exactly as given."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = torch.tensor(prompt, dtype=torch.long)
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() not in (1, 2) or (prompt.dim() == 2 and prompt.shape[0] != 1):
                raise ValueError(f"input_ids for one prompt must be (T,) or (1, T), got shape {tuple(prompt.shape)}")
            ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be an integer tensor, got {ids.dtype}")
            ids = ids.long()
        else:
            if not isinstance(prompt, (str, list)):
                raise ValueError(
                    f"prompt must be a string, a list of chat messages, a list of ids or input_ids, got {type(prompt).__name__}"
                )
            if self.tokenizer is None:
                raise ValueError("this speculator has no tokenizer: pass input_ids as a LongTensor of shape (1, T)")
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ValueError("empty prompt: give a non-empty string or input_ids")
            elif isinstance(prompt, list):
                for i, m in enumerate(prompt):
                    if (
                        not isinstance(m, dict)
                        or not isinstance(m.get("content"), str)
                        or not isinstance(m.get("role"), str)
                    ):
                        raise ValueError(
                            f"prompt message {i} must be a dict with string 'role' and 'content', got {m!r}"
                        )
                if not prompt:
                    raise ValueError("empty prompt: the message list is empty")
            else:
                raise ValueError(
                    f"prompt must be a string, a list of chat messages, a list of ids or input_ids, got {type(prompt).__name__}"
                )
            use_chat = (chat is None or chat) and getattr(self.tokenizer, "chat_template", None)
            if chat and not use_chat:
                raise ValueError("chat=True but the tokenizer has no chat template")
            if use_chat:
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                if system is not None:
                    messages = [{"role": "system", "content": system}, *messages]
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            else:
                if isinstance(prompt, list):
                    raise ValueError("a list of chat messages needs chat=True and a tokenizer with a chat template")
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            ids = torch.tensor([ids], dtype=torch.long)
        if ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids has no tokens")
        vocab = self.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"input_ids contain ids outside the target's vocabulary [0, {vocab})")
        if ids.shape[1] >= self.context_limit:
            raise ValueError(
                f"prompt too long: {ids.shape[1]} tokens, the model's context is {self.context_limit} "
                "(and at least one new token must fit)"
            )
        return ids

    def encode_batch(
        self, prompts, attention_mask: torch.Tensor | None = None, chat: bool | None = None, system: str | None = None
    ) -> list[torch.Tensor]:
        """One (T_i,) id tensor per row: ``prompts`` is a list of prompts (each as for :meth:`encode`),
        or input_ids (B, T) with an ``attention_mask`` (B, T) whose zeros mark padding (either side)."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"batched input_ids must be (B, T), got shape {tuple(prompts.shape)}")
            if attention_mask is None:
                pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
                if pad is not None and prompts.shape[0] > 1:
                    edges = (prompts[:, 0] == pad) | (prompts[:, -1] == pad)
                    if bool(edges.any()) and not bool(edges.all()):
                        raise ValueError(
                            "input_ids (B, T) look padded (some rows start or end with the pad id): pass attention_mask"
                        )
                return [self.encode(row)[0] for row in prompts]
            if attention_mask.shape != prompts.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(prompts.shape)}"
                )
            rows = []
            for r in range(prompts.shape[0]):
                keep = attention_mask[r].bool()
                if not bool(keep.any()):
                    raise ValueError(f"row {r} of input_ids is empty: its attention_mask is all zeros")
                rows.append(self.encode(prompts[r][keep])[0])
            return rows
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("a batch is a non-empty list of prompts or input_ids (B, T)")
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids (B, T), not with a list of prompts")
        out = []
        for i, p in enumerate(prompts):
            try:
                out.append(self.encode(p, chat, system)[0])
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        return out
