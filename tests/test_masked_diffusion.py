"""The standalone masked-diffusion drafter (drafters/masked_diffusion.py)."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import FixedLength
from dllm_spec.verify.sampling import SamplingParams
from tests.conftest import (
    VOCAB,
    propose,
    tiny_mdlm,
)


@pytest.mark.parametrize("steps,tree", [(1, 1), (3, 1), (2, 3)])
def test_greedy_output_equals_plain_greedy_with_masked_diffusion(target, steps, tree):
    from dllm_spec.drafters import MaskedDiffusionDrafter

    drafter = MaskedDiffusionDrafter(
        tiny_mdlm(), mask_token_id=VOCAB - 1, block_size=5, num_inference_steps=steps, tree_width=tree
    )
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5 if tree == 1 else 10))
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    ref = target.generate(prompt, max_new_tokens=25, do_sample=False, pad_token_id=1)[0, 8:]
    assert spec.generate(prompt, max_new_tokens=25).token_ids[0].tolist() == ref.tolist()
    proposal = propose(drafter, prompt, 5, SamplingParams(1.0), torch.Generator().manual_seed(0))
    assert (proposal.tokens != VOCAB - 1).all()  # never proposes the mask id
    assert proposal.is_tree == (tree > 1)
