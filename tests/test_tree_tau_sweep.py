"""The offline tau sweep (scripts/tree_tau_sweep.py): at T > 0, replaying the keyed sample and
running the drafter at the loop's anchors under the same keyed noise takes exactly the cycles the
speculative loop takes, for chains and trees."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import FixedLength
from dllm_spec.verify.sampling import SamplingParams
from tests.conftest import load_script, make_drafter


@pytest.mark.parametrize("width,nodes", [(1, 4), (3, 6)])
def test_offline_cycles_equal_the_loops_under_keyed_sampling(target, width, nodes):
    sweep = load_script("tree_tau_sweep")
    drafter = make_drafter(target, 1, tree_width=width)
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(nodes))
    prompt = torch.tensor([[3, 17, 5, 9, 22, 4, 11]])
    for seed in (0, 1, 2):
        online = spec.generate(prompt, max_new_tokens=40, temperature=1.5, seed=seed).stats
        full, features = sweep.target_response(spec, prompt, drafter.target_layer_ids, 40, 1.5, seed)
        sampling = SamplingParams(temperature=1.5)
        cycles = sweep.count_cycles(drafter, full, features, prompt.shape[1], nodes, sampling, seed)
        assert full.shape[1] - prompt.shape[1] == online.new_tokens
        assert cycles == online.target_forwards, (seed, cycles, online.target_forwards)
        assert online.accepted_tokens > 0  # the keyed guesses of a near-uniform drafter do get accepted
