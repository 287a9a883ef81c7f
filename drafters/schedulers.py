"""Unmasking schedules for few-step masked-diffusion drafting, as diffusers schedulers.

A block of ``L`` masked positions is denoised in ``S`` steps. ``set_timesteps(S, L)`` fixes how
many positions are committed at each step (as even as possible, earlier steps first);
``step(logits, tokens, masked, ...)`` commits that many masked positions. *Which* positions are
committed is the strategy, one class each:

* :class:`ConfidenceUnmaskingScheduler`: the most confident positions first (LLaDA's
  low-confidence remasking).
* :class:`LeftToRightUnmaskingScheduler`: the leftmost masked positions first.

Configs save and load like any diffusers scheduler (``save_pretrained`` / ``from_pretrained``).

Which q is returned, and why it is exact: each committed token is drawn from ``probs`` = the
warped softmax of that step's logits at its position. For lossless speculative sampling the
verifier needs q_i(x) = P(d_i = x | context, d_1..d_{i-1}). Under the left-to-right strategy every
token committed before step s lies to the left of the positions committed at step s, and tokens
committed in the same step are drawn independently given the earlier ones; so, given d_<i, d_i is
distributed exactly as the step distribution it was drawn from: q_i is exact. Under confidence
order a token may be conditioned on tokens to its *right*, so its step distribution is not that
conditional; the drafter therefore drafts deterministically (argmax) in that case and reports no
q, and the verifier uses match acceptance (a one-hot q, exact for a deterministic draft).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from dllm_spec.verify.sampling import SamplingParams, probs_from_logits, sample


@dataclass
class UnmaskingStepOutput(BaseOutput):
    """tokens: (B, L) with newly committed positions filled; masked: (B, L) still masked after the
    step; committed: (B, L) positions committed by this step; probs: (B, L, V) the distribution
    each position's token was (or would be) drawn from at this step; confidence: (B, L)."""

    tokens: torch.Tensor
    masked: torch.Tensor
    committed: torch.Tensor
    probs: torch.Tensor
    confidence: torch.Tensor


class UnmaskingScheduler(SchedulerMixin, ConfigMixin):
    """Base class: the per-step commit counts and the step; subclasses pick positions."""

    config_name = "scheduler_config.json"
    #: True when every step commits a left-to-right prefix of the masked positions (q is then exact)
    left_to_right: bool = False

    @register_to_config
    def __init__(self, num_inference_steps: int = 1) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.counts: list[int] = []
        self.set_timesteps(num_inference_steps, 1)

    def set_timesteps(self, num_inference_steps: int, block_length: int) -> None:
        """Split ``block_length`` masked positions over ``num_inference_steps`` steps (capped at one position a step)."""
        if num_inference_steps < 1 or block_length < 0:
            raise ValueError(
                f"need num_inference_steps >= 1 and block_length >= 0, got {num_inference_steps}, {block_length}"
            )
        steps = max(1, min(num_inference_steps, block_length))
        base, extra = divmod(block_length, steps)
        self.counts = [base + (1 if s < extra else 0) for s in range(steps)]
        self.timesteps = torch.arange(steps - 1, -1, -1)
        self.num_inference_steps = steps

    def _scores(self, confidence: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Higher = committed earlier. (B, L) -> (B, L)."""
        raise NotImplementedError

    def step(
        self,
        logits: torch.Tensor,
        step_index: int,
        tokens: torch.Tensor,
        masked: torch.Tensor,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
        pick: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> UnmaskingStepOutput:
        """Commit ``counts[step_index]`` masked positions (all that remain on the last step).

        logits: (B, L, V); tokens: (B, L) long; masked: (B, L) bool. ``pick``: logits -> (tokens,
        confidence) (B, L) each, replacing the argmax / draw (reproducible sampling's keyed guess).
        """
        probs = probs_from_logits(logits, sampling)  # (B, L, V)
        if pick is not None:
            proposal, confidence = pick(logits)
        elif deterministic or sampling.greedy:
            proposal = logits.argmax(-1)
            confidence = logits.float().softmax(-1).gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        else:
            proposal = sample(probs, generator)
            confidence = probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        last = step_index >= len(self.counts) - 1
        if last:
            commit = masked.clone()
        else:
            count = self.counts[step_index]
            scores = self._scores(confidence, masked).masked_fill(~masked, float("-inf"))
            top = scores.topk(min(count, scores.shape[1]), dim=-1).indices
            commit = torch.zeros_like(masked).scatter(1, top, True) & masked
        new_tokens = torch.where(commit, proposal, tokens)
        return UnmaskingStepOutput(new_tokens, masked & ~commit, commit, probs, confidence)


class ConfidenceUnmaskingScheduler(UnmaskingScheduler):
    """Commit the most confident masked positions first (LLaDA low-confidence remasking)."""

    def _scores(self, confidence, masked):
        return confidence.float()


class LeftToRightUnmaskingScheduler(UnmaskingScheduler):
    """Commit the leftmost masked positions first (makes the returned q exact at temperature > 0)."""

    left_to_right = True

    def _scores(self, confidence, masked):
        length = masked.shape[1]
        return -torch.arange(length, device=masked.device, dtype=torch.float32).expand_as(confidence)
