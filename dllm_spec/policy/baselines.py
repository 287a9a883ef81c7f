"""Baseline block-length policies behind the same interface: fixed length, a confidence threshold
(FailFast-style), a moving average of accepted length (DiffuSpec/SGLang-style) and transformers'
+2/-1 heuristic."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dllm_spec.policy.base import BlockLengthPolicy
from dllm_spec.verify.proposal import DraftProposal


@dataclass
class FixedLength(BlockLengthPolicy):
    """Always draft and verify ``k`` tokens."""

    k: int = 8

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"block length must be >= 0, got {self.k}")
        self.name = f"fixed-{self.k}"

    def begin_cycle(self, rows: int = 1) -> int:
        return self.k


@dataclass
class ConfidenceThreshold(BlockLengthPolicy):
    """Draft ``max_k``; verify up to (not including) the first position whose confidence < theta."""

    theta: float = 0.4
    max_k: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.theta <= 1 or self.max_k < 1:
            raise ValueError(f"need 0 <= theta <= 1 and max_k >= 1, got theta={self.theta}, max_k={self.max_k}")
        self.name = f"threshold-{self.theta:g}"

    def begin_cycle(self, rows: int = 1) -> int:
        return self.max_k

    def choose(self, proposal: DraftProposal) -> list[int]:
        out = []
        for r, n in enumerate(proposal.lengths):
            below = (proposal.confidence[r, :n] < self.theta).nonzero()
            out.append(int(below[0]) if below.numel() else n)
        return out


@dataclass
class MovingAverageLength(BlockLengthPolicy):
    """k = ceil(moving average of accepted length) + 1, within [1, max_k]."""

    max_k: int = 16
    momentum: float = 0.7
    average: float = 4.0

    def __post_init__(self) -> None:
        if self.max_k < 1 or not 0 <= self.momentum < 1:
            raise ValueError(f"need max_k >= 1 and 0 <= momentum < 1, got {self.max_k}, {self.momentum}")
        self.name = "moving-average"

    def begin_cycle(self, rows: int = 1) -> int:
        return max(1, min(self.max_k, math.ceil(self.average) + 1))

    def observe(self, proposal, verified, accepted, draft_time_s, verify_time_s, paths=None) -> None:
        for v, a in zip(verified, accepted):
            if v:
                self.average = self.momentum * self.average + (1 - self.momentum) * a


@dataclass
class AssistedHeuristic(BlockLengthPolicy):
    """transformers' ``num_assistant_tokens_schedule="heuristic"``: +2 after a fully accepted draft, -1 otherwise."""

    k: int = 5
    max_k: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.max_k:
            raise ValueError(f"need 1 <= k <= max_k, got k={self.k}, max_k={self.max_k}")
        self.name = "heuristic"

    def begin_cycle(self, rows: int = 1) -> int:
        return self.k

    def observe(self, proposal, verified, accepted, draft_time_s, verify_time_s, paths=None) -> None:
        tried = [(v, a) for v, a in zip(verified, accepted) if v]
        if tried:  # +2 when every row took its whole draft, -1 otherwise
            self.k = min(self.max_k, self.k + 2) if all(a == v for v, a in tried) else max(1, self.k - 1)
