"""Prompt-lookup drafting: copy the tokens that followed the most recent earlier occurrence of the
context's trailing n-gram (Saxena 2023; transformers' ``prompt_lookup_num_tokens``).

Each row keeps its committed tokens and an index n-gram -> start of its latest occurrence that has a
continuation, updated as tokens commit, so a lookup costs O(max_ngram) dictionary reads per row
instead of a scan of the whole sequence.
"""

from __future__ import annotations

import torch

from dllm_spec.drafters.base import Drafter, DraftProposal, Sequences
from dllm_spec.verify.sampling import SamplingParams


class _RowIndex:
    """One row's tokens and n-gram index (n-gram -> start of its latest occurrence with a continuation)."""

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}

    def extend(self, new: list[int]) -> None:
        toks = self.tokens
        for t in new:
            p = len(toks)  # t lands at position p: every n-gram ending at p - 1 now has a continuation
            for n in range(1, min(self.max_ngram, p) + 1):
                self.index[tuple(toks[p - n : p])] = p - n
            toks.append(t)

    def lookup(self, n_max: int, n_min: int, max_tokens: int) -> tuple[list[int], int]:
        toks = self.tokens
        for n in range(min(n_max, len(toks) - 1), n_min - 1, -1):
            start = self.index.get(tuple(toks[len(toks) - n :]))
            if start is not None:
                return toks[start + n : start + n + max_tokens], n
        return [], 0


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
        self._rows: list[_RowIndex] = []

    def begin(self, rows: list[int], seqs: Sequences, features, counts) -> None:
        while len(self._rows) < seqs.batch:
            self._rows.append(_RowIndex(self.max_ngram))
        for r in rows:
            self._rows[r] = _RowIndex(self.max_ngram)
            self._rows[r].extend(seqs.row(r).tolist())

    def commit(self, seqs: Sequences, features, counts) -> None:
        self._sync(seqs)

    def reorder(self, index: list[int]) -> None:
        self._rows = [self._rows[i] for i in index]

    def _sync(self, seqs: Sequences) -> None:
        """Index every row's tokens committed since the last call; rows this drafter was not told about
        (used on its own, outside the loop) or that now hold another sequence start over."""
        while len(self._rows) < seqs.batch:
            self._rows.append(_RowIndex(self.max_ngram))
        for r in range(seqs.batch):
            row = self._rows[r]
            n = seqs.lengths[r]
            if len(row.tokens) > n or (row.tokens and row.tokens[-1] != int(seqs.ids[r, len(row.tokens) - 1])):
                self._rows[r] = row = _RowIndex(self.max_ngram)  # another sequence now: start over
            if n > len(row.tokens):
                row.extend(seqs.ids[r, len(row.tokens) : n].tolist())

    def propose(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        if max_tokens <= 0:
            return DraftProposal.empty(seqs.batch, seqs.device)
        self._sync(seqs)
        found = [self._rows[r].lookup(self.max_ngram, self.min_ngram, max_tokens) for r in range(seqs.batch)]
        width = max(len(t) for t, _ in found)
        tokens = torch.zeros((seqs.batch, width), dtype=torch.long)
        confidence = torch.zeros((seqs.batch, width))
        for r, (toks, n) in enumerate(found):
            tokens[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            confidence[r, : len(toks)] = n / self.max_ngram
        return DraftProposal(
            tokens.to(seqs.device), None, confidence.to(seqs.device), forwards=0, lengths=[len(t) for t, _ in found]
        )
