"""Online calibration of a drafter's confidence: confidence bucket -> probability the draft is
accepted given its parent was (Beta-prior counts per bucket)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dllm_spec.verify.tree import chain_parents


@dataclass
class AcceptanceCalibrator:
    """Maps a drafter confidence to P(accept | every earlier draft accepted), learned online.

    Confidence is bucketed into ``bins``; each bucket keeps Beta-prior counts, starting at a mean
    equal to the bucket's centre (so an uncalibrated drafter is first taken at its word).
    """

    bins: int = 10
    prior_strength: float = 4.0
    accepted: torch.Tensor = field(default=None)  # type: ignore[assignment]
    trials: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.bins < 1 or self.prior_strength <= 0:
            raise ValueError(f"need bins >= 1 and prior_strength > 0, got {self.bins}, {self.prior_strength}")
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins
        self.accepted = centres * self.prior_strength
        self.trials = torch.full((self.bins,), self.prior_strength, dtype=torch.float64)

    def _bucket(self, confidence: torch.Tensor) -> torch.Tensor:
        return (confidence.double().clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)

    def __call__(self, confidence: torch.Tensor) -> torch.Tensor:
        """(k,) confidences -> (k,) conditional acceptance probabilities."""
        b = self._bucket(confidence.cpu())
        return (self.accepted[b] / self.trials[b]).float()

    def update(
        self,
        confidence: torch.Tensor,
        verified: int,
        accepted: int,
        parents: torch.Tensor | None = None,
        path: torch.Tensor | None = None,
    ) -> None:
        """Every verified node whose parent is the root or on the accepted path was tested (given its
        parent was accepted), and those on the path were accepted; the rest were never tested and
        teach nothing. A chain (``parents`` None) is the tree [-1, 0, 1, ...] with the path
        0..accepted-1: its first ``accepted`` positions hit, the next (if verified) missed."""
        if parents is None or path is None:
            parents, path = chain_parents(verified), torch.arange(accepted)
        on_path = torch.zeros(verified + 1, dtype=torch.bool)
        on_path[0] = True
        on_path[path.cpu() + 1] = True
        tested_nodes = on_path[parents[:verified].cpu() + 1].nonzero().flatten()  # nodes whose parent was reached
        if tested_nodes.numel() == 0:
            return
        b = self._bucket(confidence[tested_nodes.to(confidence.device)].cpu())
        hits = on_path[tested_nodes + 1].double()
        self.accepted.index_add_(0, b, hits)
        self.trials.index_add_(0, b, torch.ones_like(hits))
