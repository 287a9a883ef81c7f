"""Block-length policies: how many tokens the drafter drafts and how many of them are verified
each cycle. The loop consults one policy object; only fixed lengths exist so far."""

from __future__ import annotations

from dataclasses import dataclass

from drafters.base import DraftProposal


class BlockLengthPolicy:
    """Interface. ``draft_length``: tokens to ask the drafter for; ``choose``: how many of the
    proposal to verify; ``observe``: feedback after verification."""

    name = "policy"

    def draft_length(self) -> int:
        raise NotImplementedError

    def choose(self, proposal: DraftProposal) -> int:
        return proposal.length

    def observe(self, proposal: DraftProposal, verified: int, accepted: int) -> None:
        """Called after every cycle (for policies that learn online)."""


@dataclass(frozen=True)
class FixedLength(BlockLengthPolicy):
    """Always draft and verify ``k`` tokens."""

    k: int = 8

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"block length must be >= 0, got {self.k}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"fixed-{self.k}"

    def draft_length(self) -> int:
        return self.k
