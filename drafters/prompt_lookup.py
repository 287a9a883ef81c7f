"""Prompt-lookup drafting: copy the tokens that followed the most recent earlier occurrence of the
context's trailing n-gram (Saxena 2023; transformers' ``prompt_lookup_num_tokens``)."""

from __future__ import annotations

import torch

from drafters.base import Drafter, DraftProposal
from verify.sampling import SamplingParams


class PromptLookupDrafter(Drafter):
    """N-gram match over prompt + generated text. No model, no q (the verifier uses match acceptance).

    Args:
        max_ngram: longest trailing n-gram to look up (tried first).
        min_ngram: shortest n-gram accepted as a match.
    Confidence is n / max_ngram for a match on an n-gram: longer matches are more reliable.
    """

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def _lookup(self, row: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, int]:
        length = row.shape[0]
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            windows = row.unfold(0, n, 1)[:-1]  # (length - n, n): every earlier n-gram, the trailing one excluded
            hits = (windows == row[-n:]).all(dim=1).nonzero().flatten()
            # most recent occurrence whose continuation is non-empty
            for start in reversed(hits.tolist()):
                follow = row[start + n: start + n + max_tokens]
                if follow.numel() > 0:
                    return follow, n
        return row[:0], 0

    def propose(self, input_ids: torch.Tensor, max_tokens: int, sampling: SamplingParams, generator) -> DraftProposal:
        if input_ids.shape[0] != 1 or max_tokens <= 0:
            return DraftProposal.empty(input_ids.shape[0], input_ids.device)
        tokens, n = self._lookup(input_ids[0], max_tokens)
        confidence = torch.full((1, tokens.numel()), n / self.max_ngram, device=input_ids.device)
        return DraftProposal(tokens.unsqueeze(0), None, confidence, forwards=0)
