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
from dataclasses import replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from drafters.base import Drafter, DraftProposal
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

    def begin(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        self.primary.begin(input_ids, None)
        self.fallback.begin(input_ids, features)

    def propose(self, input_ids: torch.Tensor, max_tokens: int, sampling: SamplingParams,
                generator: torch.Generator | None) -> DraftProposal:
        first = replace(self.primary.propose(input_ids, max_tokens, sampling, generator), source=self.primary.name)

        def allowed() -> bool:  # asked only when the answer matters: the gate counts the cycles a source sits out
            return self.gate is None or self.gate(self.fallback.name)

        if self.fallback.tree_width > 1:  # merge: the lookup's chain becomes one more branch of the tree
            if first.parents is not None or not allowed():
                self.last_source = self.primary.name
                return first
            self.last_source = self.fallback.name
            tree = self.fallback.propose(input_ids, max_tokens, sampling, generator)
            if not tree.is_tree or not first.length:
                return replace(tree, source=self.fallback.name)
            tokens, parents, scores = graft_chain(tree.tokens[0], tree.parents, tree.confidence[0], first.tokens[0], first.confidence[0])
            merged = DraftProposal(tokens.unsqueeze(0), None, scores.unsqueeze(0), tree.forwards, self.fallback.name, parents)
            return merged.truncate(max_tokens)
        good = first.length and float(first.confidence[:, 0].min()) >= self.min_confidence
        if good or not allowed():
            self.last_source = self.primary.name
            return first  # a weak or empty lookup is still free to offer: the policy may verify none of it
        self.last_source = self.fallback.name
        return replace(self.fallback.propose(input_ids, max_tokens, sampling, generator), source=self.fallback.name)

    def commit(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        self.primary.commit(input_ids, None)
        self.fallback.commit(input_ids, features)
