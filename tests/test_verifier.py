"""The verifier's prefill (verify/verifier.py): prompts of very different lengths are grouped so
that a short prompt is never padded to a long one, and the result is what prefilling each alone gives."""

from __future__ import annotations

import pytest
import torch

from dllm_spec.verify.verifier import PREFILL_SLACK, PREFILL_WASTE, Verifier, prefill_groups


def test_prefill_groups_bound_the_padding_and_cover_every_prompt_once():
    counts = [50, 176, 310, 42, 991, 41, 148, 69, 38, 521, 244, 66, 56, 36, 112, 45]  # a real batch
    groups = prefill_groups(counts)
    assert sorted(i for g in groups for i in g) == list(range(len(counts)))
    for g in groups:
        tokens = sum(counts[i] for i in g)
        assert max(counts[i] for i in g) * len(g) <= (1 + PREFILL_WASTE) * tokens + PREFILL_SLACK
    padded = sum(max(counts[i] for i in g) * len(g) for g in groups)
    assert padded < 1.5 * sum(counts) < max(counts) * len(counts) / 3  # one padded forward: 5.4x the tokens
    assert prefill_groups([5, 7, 6]) == [[1, 2, 0]]  # short prompts share one forward
    assert prefill_groups([]) == []


@pytest.mark.parametrize("lengths", [(4, 200, 9, 120), (30, 30, 3)])
def test_grouped_prefill_equals_prefilling_each_prompt_alone(target, lengths):
    """Cache rows, features and the next forward's logits match a one-prompt prefill; duplicate
    prompts (samples of one prompt) are copied rows."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, target.config.vocab_size, (n,), generator=g) for n in lengths]
    prompts.append(prompts[0].clone())  # a second sample of the first prompt
    together = Verifier(target, layer_ids=(1, 2), max_batch=len(prompts))
    rows, features, counts = together.prefill(prompts)
    assert counts == [n - 1 for n in (*lengths, lengths[0])] and features.shape[:2] == (len(prompts), max(counts))
    for r, p in enumerate(prompts):
        alone = Verifier(target, layer_ids=(1, 2), max_batch=1)
        _, ref, _ = alone.prefill([p])
        n = counts[r]
        torch.testing.assert_close(features[r, :n], ref[0, :n], atol=1e-5, rtol=1e-5)
        assert features[r, n:].abs().sum() == 0  # zero-padded
        for layer in range(target.config.num_hidden_layers):
            torch.testing.assert_close(
                together.cache.keys[layer][rows[r], :, :n], alone.cache.keys[layer][0, :, :n], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                together.cache.values[layer][rows[r], :, :n], alone.cache.values[layer][0, :, :n], atol=1e-5, rtol=1e-5
            )
    assert together.cache.lengths[: len(prompts)] == counts
