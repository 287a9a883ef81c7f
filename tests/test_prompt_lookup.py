"""Prompt lookup (drafters/prompt_lookup.py): the latest longest match, no match, the per-row index
against a brute-force scan, and rows of a batch."""

from __future__ import annotations

import pytest
import torch

from dllm_spec.drafters import PromptLookupDrafter
from dllm_spec.verify.sampling import SamplingParams
from tests.conftest import propose


def test_prompt_lookup_copies_the_continuation_of_the_latest_longest_match():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 6, 7]])
    proposal = propose(PromptLookupDrafter(max_ngram=2), ids, 3, SamplingParams(), None)
    assert proposal.tokens.tolist() == [[3, 4, 2]]  # the most recent earlier "6 7" is followed by 3 4 2
    assert proposal.q is None and proposal.confidence.shape == (1, 3)


def test_prompt_lookup_without_match_proposes_nothing():
    proposal = propose(PromptLookupDrafter(), torch.tensor([[1, 2, 3, 4]]), 5, SamplingParams(), None)
    assert proposal.length == 0


def test_prompt_lookup_rejects_invalid_ngram_sizes():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


def test_the_row_index_finds_what_a_scan_finds_as_the_sequence_grows():
    """The incremental n-gram index against a brute-force scan, token by token, on a random row."""
    g = torch.Generator().manual_seed(0)
    row = torch.randint(0, 6, (200,), generator=g).tolist()
    drafter = PromptLookupDrafter(max_ngram=3)

    def scan(seq: list[int], k: int) -> list[int]:
        for n in range(min(3, len(seq) - 1), 0, -1):
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == seq[-n:]:
                    return seq[start + n : start + n + k]
        return []

    for end in range(2, 200, 7):
        ids = torch.tensor([row[:end]])
        got = propose(drafter, ids, 4, SamplingParams()).tokens[0].tolist()
        assert got == scan(row[:end], 4), end


def test_each_row_of_a_batch_gets_its_own_lookup():
    from dllm_spec.drafters.base import Sequences

    ids = torch.zeros((2, 8), dtype=torch.long)
    ids[0, :5] = torch.tensor([1, 2, 3, 1, 2])  # row 0 has 5 tokens (the rest is padding)
    ids[1] = torch.tensor([4, 5, 9, 9, 4, 5, 7, 4])
    proposal = PromptLookupDrafter(max_ngram=2).propose(Sequences(ids, [5, 8]), 3, SamplingParams(), [None, None])
    assert proposal.tokens[0, : proposal.lengths[0]].tolist() == [3, 1, 2]  # after the earlier "1 2"
    assert proposal.tokens[1, : proposal.lengths[1]].tolist() == [5, 7, 4]  # after the latest earlier "4"
