"""The block-length policy interface: what the loop asks a policy each cycle."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from dllm_spec.verify.proposal import DraftProposal


class BlockLengthPolicy:
    """Interface; stateful policies learn across cycles and across ``generate`` calls."""

    name = "policy"

    @property
    def last_prediction(self) -> float | None:
        """The first row's expected accepted drafts for the last choice (None when the policy does not predict)."""
        return None if not self.last_predictions else self.last_predictions[0]

    def bind(self, target: PreTrainedModel) -> None:
        """Called once when paired with a target (e.g. to load its latency curve)."""

    def prepare(self, max_rows: int) -> None:
        """Called before a batch of up to ``max_rows`` rows starts (e.g. to measure its latency)."""

    def begin_cycle(self, rows: int = 1) -> int:
        """Start a cycle over ``rows`` rows and return the longest draft to ask the drafter for.

        Called exactly once per cycle: stateful policies advance their per-cycle counters here (a
        losing source's sit-out interval), so it is not a query."""
        raise NotImplementedError

    def choose(self, proposal: DraftProposal) -> list[int]:
        """How many of each row's proposed tokens to verify."""
        return list(proposal.lengths)

    #: expected accepted drafts per row for the last choice (for calibration stats), or None
    last_predictions: list[float] | None = None

    def request_draft(self, source: str) -> bool:
        """A composite drafter asks to run its (costly) part ``source`` this cycle; the answer is
        whether it may. A refusal counts as a cycle the source sat out, so ask only when the answer
        decides what runs."""
        return True

    def observe(
        self,
        proposal: DraftProposal,
        verified: list[int],
        accepted: list[int],
        draft_time_s: float,
        verify_time_s: float,
        paths: list[torch.Tensor] | None = None,
    ) -> None:
        """Feedback after a cycle: ``proposal`` is everything drafted; of row r the first
        ``verified[r]`` tokens were verified and ``accepted[r]`` accepted: the first ones of a chain,
        the nodes ``paths[r]`` (n,) of a draft tree."""
