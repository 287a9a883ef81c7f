"""Unmasking schedulers (drafters/schedulers.py)."""

from __future__ import annotations

import pytest
import torch

from dllm_spec.drafters.schedulers import ConfidenceUnmaskingScheduler, LeftToRightUnmaskingScheduler
from dllm_spec.verify.sampling import SamplingParams


def test_scheduler_commits_every_position_within_its_steps():
    for cls in (ConfidenceUnmaskingScheduler, LeftToRightUnmaskingScheduler):
        s = cls(num_inference_steps=3)
        s.set_timesteps(3, 7)
        assert s.counts == [3, 2, 2]
        tokens = torch.zeros((1, 7), dtype=torch.long)
        masked = torch.ones((1, 7), dtype=torch.bool)
        logits = torch.randn(1, 7, 11, generator=torch.Generator().manual_seed(0))
        order = []
        for step in range(3):
            out = s.step(logits, step, tokens, masked, SamplingParams())
            order.append(out.committed[0].nonzero().flatten().tolist())
            tokens, masked = out.tokens, out.masked
        assert not masked.any() and torch.equal(tokens, logits.argmax(-1))
        if cls is LeftToRightUnmaskingScheduler:
            assert order == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="num_inference_steps"):
        ConfidenceUnmaskingScheduler(num_inference_steps=0)
