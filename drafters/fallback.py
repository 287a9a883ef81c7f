"""A free drafter first, a model drafter when it has nothing good: prompt lookup, then block diffusion.

Copying from the context costs nothing and, where it matches (repeated code, quoted text, lists),
proposes long and reliable drafts; a model drafter costs a forward per cycle but drafts anywhere.
:class:`FallbackDrafter` asks the free one first and calls the model drafter only when the free
proposal is empty or its confidence is below ``min_confidence``, and only when the block-length
policy's gate says the model drafter pays (the cost-aware policy keeps its statistics per source, so
it can stop calling a losing model drafter without also stopping the free lookups). Both stay in
step with the committed sequence (``begin``/``commit`` reach both every cycle), so the model
drafter drafts after cycles it sat out exactly as a fresh drafter would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from drafters.base import Drafter, DraftProposal, Sequences
from verify.sampling import SamplingParams
from verify.tree import graft_chain


class FallbackDrafter(Drafter):
    """``primary`` (cheap, e.g. prompt lookup) when it proposes with confidence >= ``min_confidence``
    at its first token, else ``fallback`` (e.g. the block-diffusion drafter).

    Each proposal comes whole from one drafter, with that drafter's q (``None`` for prompt lookup:
    match acceptance, exact for a deterministic draft) and confidences, so verification stays
    lossless. Proposals carry their ``source`` (the sub-drafter's name); ``last_source`` says which
    drafter made the last one (for stats and tests).

    Args:
        primary: the drafter asked first; it must need no target features.
        fallback: the drafter asked when the primary has nothing good.
        min_confidence: the primary's first-token confidence needed to use its proposal (prompt
            lookup's confidence is n / max_ngram for a match on an n-gram: 0.5 with the default
            max_ngram 3 asks for a match on at least 2 tokens).
    """

    def __init__(self, primary: Drafter, fallback: Drafter, min_confidence: float = 0.5) -> None:
        if primary.target_layer_ids:
            raise ValueError(f"the primary drafter '{primary.name}' needs target features; put it second")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        self.primary = primary
        self.fallback = fallback
        self.min_confidence = min_confidence
        self.target_layer_ids = fallback.target_layer_ids
        self.tree_width = max(primary.tree_width, fallback.tree_width)
        self.name = f"{primary.name}+{fallback.name}"
        self.last_source: str | None = None
        self.gate: Callable[[str], bool] | None = None

    def attach_gate(self, gate: Callable[[str], bool] | None) -> None:
        self.gate = gate

    @property
    def vocab_size(self) -> int | None:
        return self.fallback.vocab_size

    def bind(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.primary.bind(target, tokenizer)
        self.fallback.bind(target, tokenizer)

    def begin(self, rows: list[int], seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        self.primary.begin(rows, seqs, None, counts)
        self.fallback.begin(rows, seqs, features, counts)

    def propose(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        first = self.primary.propose(seqs, max_tokens, sampling, generators)
        first.sources = [self.primary.name] * first.batch
        first.source = self.primary.name

        def allowed() -> bool:  # asked only when the answer matters: the gate counts the cycles a source sits out
            return self.gate is None or self.gate(self.fallback.name)

        if self.fallback.tree_width > 1:  # merge: each row's lookup chain becomes one more branch of its tree
            if first.is_tree or not allowed():
                self.last_source = self.primary.name
                return first
            self.last_source = self.fallback.name
            tree = self.fallback.propose(seqs, max_tokens, sampling, generators)
            rows = []
            for r in range(tree.batch):
                mine, chain = tree.row(r), first.row(r)
                if mine.is_tree and chain.length:
                    tokens, parents, scores = graft_chain(mine.tokens[0], mine.parents[0], mine.confidence[0], chain.tokens[0],
                                                          chain.confidence[0])
                    mine = DraftProposal(tokens.unsqueeze(0), None, scores.unsqueeze(0), tree.forwards, None,
                                         parents.unsqueeze(0)).truncate(max_tokens)
                mine.sources = [self.fallback.name]
                rows.append(mine)
            return DraftProposal.stack(rows, tree.forwards)
        good = [n > 0 and float(first.confidence[r, 0]) >= self.min_confidence for r, n in enumerate(first.lengths)]
        if all(good) or not allowed():
            self.last_source = self.primary.name
            return first  # a weak or empty lookup is still free to offer: the policy may verify none of it
        self.last_source = self.fallback.name
        second = self.fallback.propose(seqs, max_tokens, sampling, generators)
        second.sources = [self.fallback.name] * second.batch
        if not any(good):
            second.source = self.fallback.name
            return second
        return DraftProposal.stack([first.row(r) if g else second.row(r) for r, g in enumerate(good)], second.forwards)

    def commit(self, seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        self.primary.commit(seqs, None, counts)
        self.fallback.commit(seqs, features, counts)

    def reorder(self, index: list[int]) -> None:
        self.primary.reorder(index)
        self.fallback.reorder(index)
