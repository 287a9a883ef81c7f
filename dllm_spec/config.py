"""Configuration objects (frozen, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from verify.sampling import SamplingParams

__all__ = ["SpeculatorConfig", "SamplingParams"]


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
