"""Configuration objects (frozen, validated on construction)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch

from dllm_spec.verify.sampling import MIN_TEMPERATURE, SAMPLING_METHODS, SamplingParams

__all__ = ["GenerationParams", "SpeculatorConfig", "SamplingParams"]

#: the sampling method at temperature > 0 unless one is asked for (BENCHMARKS.md, "Sampling at T > 0")
DEFAULT_SAMPLING = "reproducible"


@dataclass(frozen=True)
class SpeculatorConfig:
    """How the speculator drafts and verifies.

    block_size: the most tokens (tree nodes) drafted per cycle, whatever the policy: the default
        cost-aware policy is built with it as its ``max_k``, and a policy passed as ``policy=``
        (``FixedLength(k)``, ...) is capped by it. 0 is plain decoding.
    verification: ``"token"`` (Leviathan/Chen speculative sampling) or ``"block"`` (Sun et al.
        block verification); greedy decoding is exact argmax matching either way.
    max_batch_size: the most sequences generated at once (``generate`` with more prompts runs
        them through that many slots with continuous batching).
    """

    block_size: int = 16
    verification: str = "token"
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if not 0 <= self.block_size <= 256:
            raise ValueError(f"block_size must be in [0, 256], got {self.block_size}")
        if self.verification not in ("token", "block"):
            raise ValueError(f"verification must be 'token' or 'block', got {self.verification!r}")


def _scalar(x):
    """A 0-d tensor or NumPy scalar as the Python number it holds; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        return x.item()
    if isinstance(x, numbers.Number) and hasattr(x, "item"):
        return x.item()
    return x


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class GenerationParams:
    """The arguments every generation call shares, named as in transformers' ``generate``.

    max_new_tokens / min_new_tokens: the new-token cap, and how many tokens come before a stop id
        may end a row (stop ids are suppressed until then);
    temperature (0: greedy), top_k (0: off), top_p (1: off);
    seed: the key of a row's random draws (``None``: a random one, recorded in the output's stats);
        row i of a batch uses ``seed + i``, and sample j of prompt i (``num_return_sequences`` N)
        ``seed + i * N + j``;
    sampling: ``"reproducible"`` (a seed gives the same text whatever the drafter, the batch and
        the speculation) or ``"speculative"`` (rejection sampling, which accepts a little more but
        whose draws depend on the drafts);
    num_return_sequences: samples per prompt (the prompt is prefilled once for all of them);
    stop_token_ids: extra stop ids beside the tokenizer's eos; ignore_eos: stop ids do not end
        generation (vLLM's ``ignore_eos``);
    chat / system: how a text prompt is encoded (chat template, system message).

    Integers may be Python ints, NumPy integers or 0-d tensors; they are stored as Python ints.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    sampling: str = DEFAULT_SAMPLING
    num_return_sequences: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    chat: bool | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):  # NumPy scalars and 0-d tensors as Python numbers
            object.__setattr__(self, f.name, _scalar(getattr(self, f.name)))
        if self.stop_token_ids is not None:
            ids = [_scalar(i) for i in self.stop_token_ids] if isinstance(self.stop_token_ids, (list, tuple)) else None
            if ids is None or not all(_is_int(i) and i >= 0 for i in ids):
                raise ValueError(
                    f"stop_token_ids must be a list of token ids (integers >= 0), got {self.stop_token_ids!r}"
                )
            object.__setattr__(self, "stop_token_ids", tuple(ids))
        self._check_lengths()
        self._check_sampling()
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise ValueError(f"chat must be None, True or False, got {self.chat!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"system must be a string, got {type(self.system).__name__}")

    def _check_lengths(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens!r}"
            )
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")

    def _check_sampling(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or not (t == 0 or t >= MIN_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if self.sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {self.sampling!r}")

    @classmethod
    def build(cls, params: "GenerationParams | None", kwargs: dict) -> "GenerationParams":
        """``params`` (or the defaults) with ``kwargs`` replaced; an unknown keyword is a ValueError naming it."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown generation argument(s) {unknown}: expected some of {sorted(names)}")
        if params is not None and not isinstance(params, cls):
            raise ValueError(f"generation_params must be a GenerationParams, got {type(params).__name__}")
        base = {f.name: getattr(params, f.name) for f in fields(cls)} if params is not None else {}
        return cls(**{**base, **kwargs})

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(float(self.temperature), self.top_k, float(self.top_p), self.sampling)

    def row_seed(self, row: int) -> int | None:
        """The seed of output row ``row`` (prompt i, sample j: row i * N + j); None when unseeded."""
        return None if self.seed is None else (self.seed + row) % 2**63
