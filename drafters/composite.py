"""Two drafters behind one: a free one (prompt lookup) first, a model drafter beside it.

Copying from the context costs nothing and, where it matches (repeated code, quoted text, lists),
proposes long and reliable drafts; a model drafter costs a forward per cycle but drafts anywhere.
Two ways to combine them, one class each:

* :class:`FallbackDrafter` (chains): each row takes the free chain when its first token's
  confidence reaches ``min_confidence``, else the model drafter's chain.
* :class:`GraftDrafter` (trees): each row's free chain is grafted onto the model drafter's tree as
  one more branch, so the verifier's tree walk takes whichever the target agrees with.

Either calls the model drafter only when the block-length policy lets it
(``request_draft(source)``: the cost-aware policy keeps statistics per source, so it can stop
calling a losing model drafter without also stopping the free lookups). Both parts stay in step
with the committed sequence (``begin``/``commit`` reach both every cycle), so the model drafter
drafts after cycles it sat out exactly as a fresh drafter would. :func:`pair_drafter` picks the
class from the model drafter's ``tree_width``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.drafters.base import Drafter, DraftProposal, Sequences
from dllm_spec.verify.sampling import SamplingParams
from dllm_spec.verify.tree import graft_chain


class _PairDrafter(Drafter):
    """What both combinations share: binding, bookkeeping and the policy gate."""

    def __init__(self, primary: Drafter, fallback: Drafter) -> None:
        if primary.target_layer_ids:
            raise ValueError(f"the primary drafter '{primary.name}' needs target features; put it second")
        self.primary = primary
        self.fallback = fallback
        self.target_layer_ids = fallback.target_layer_ids
        self.tree_width = max(primary.tree_width, fallback.tree_width)
        self.name = f"{primary.name}+{fallback.name}"
        self.last_source: str | None = None  # which part made the last proposal (stats, tests)
        self.gate: Callable[[str], bool] | None = None

    def attach_gate(self, gate: Callable[[str], bool] | None) -> None:
        self.gate = gate

    def _model_allowed(self) -> bool:
        """Asked only when the answer decides what runs: the gate counts the cycles a source sits out."""
        return self.gate is None or self.gate(self.fallback.name)

    def _free(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        first = self.primary.propose(seqs, max_tokens, sampling, generators)
        first.sources = [self.primary.name] * first.batch
        first.source = self.primary.name
        return first

    @property
    def vocab_size(self) -> int | None:
        return self.fallback.vocab_size

    def bind(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.primary.bind(target, tokenizer)
        self.fallback.bind(target, tokenizer)

    def kernel_modules(self) -> list[nn.Module]:
        return self.primary.kernel_modules() + self.fallback.kernel_modules()

    def begin(self, rows: list[int], seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        self.primary.begin(rows, seqs, None, counts)
        self.fallback.begin(rows, seqs, features, counts)

    def commit(self, seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        self.primary.commit(seqs, None, counts)
        self.fallback.commit(seqs, features, counts)

    def reorder(self, index: list[int]) -> None:
        self.primary.reorder(index)
        self.fallback.reorder(index)


class FallbackDrafter(_PairDrafter):
    """``primary`` (cheap, e.g. prompt lookup) when it proposes with confidence >= ``min_confidence``
    at its first token, else ``fallback`` (a chain drafter, e.g. block diffusion).

    Each row's proposal comes whole from one drafter, with that drafter's q (``None`` for prompt
    lookup: match acceptance, exact for a deterministic draft) and confidences, so verification
    stays lossless. Proposals carry their per-row ``sources``.

    Args:
        primary: the drafter asked first; it must need no target features.
        fallback: the chain drafter asked for the rows where the primary has nothing good.
        min_confidence: the primary's first-token confidence needed to use its proposal (prompt
            lookup's confidence is n / max_ngram for a match on an n-gram: 0.5 with the default
            max_ngram 3 asks for a match on at least 2 tokens).
    """

    def __init__(self, primary: Drafter, fallback: Drafter, min_confidence: float = 0.5) -> None:
        if fallback.tree_width > 1:
            raise ValueError(
                f"fallback drafter '{fallback.name}' drafts trees (tree_width={fallback.tree_width}): "
                "combine it with GraftDrafter, which grafts the primary's chain onto each tree"
            )
        if (
            isinstance(min_confidence, bool)
            or not isinstance(min_confidence, (int, float))
            or not 0.0 <= min_confidence <= 1.0
        ):
            raise ValueError(f"min_confidence must be a number in [0, 1], got {min_confidence!r}")
        super().__init__(primary, fallback)
        self.min_confidence = float(min_confidence)

    def propose(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        first = self._free(seqs, max_tokens, sampling, generators)
        good = [n > 0 and float(first.confidence[r, 0]) >= self.min_confidence for r, n in enumerate(first.lengths)]
        if all(good) or not self._model_allowed():
            self.last_source = self.primary.name
            return first  # a weak or empty lookup is still free to offer: the policy may verify none of it
        self.last_source = self.fallback.name
        second = self.fallback.propose(seqs, max_tokens, sampling, generators)
        second.sources = [self.fallback.name] * second.batch
        if not any(good):
            second.source = self.fallback.name
            return second
        return DraftProposal.stack([first.row(r) if g else second.row(r) for r, g in enumerate(good)], second.forwards)


class GraftDrafter(_PairDrafter):
    """``fallback``'s draft tree with ``primary``'s chain (e.g. prompt lookup) grafted on as one
    more branch per row (shared prefixes merge; the chain's nodes keep their confidences).

    When the primary already proposes trees, or the policy keeps the model drafter out this cycle,
    the primary's proposal is used alone. The tree walk accepts the path the target agrees with, so
    the merge is lossless.

    Args:
        primary: the free drafter; it must need no target features.
        fallback: the tree drafter (``tree_width`` > 1).
    """

    def __init__(self, primary: Drafter, fallback: Drafter) -> None:
        if fallback.tree_width < 2:
            raise ValueError(f"drafter '{fallback.name}' drafts chains (tree_width=1): combine it with FallbackDrafter")
        super().__init__(primary, fallback)

    def propose(self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators) -> DraftProposal:
        first = self._free(seqs, max_tokens, sampling, generators)
        if first.is_tree or not self._model_allowed():
            self.last_source = self.primary.name
            return first
        self.last_source = self.fallback.name
        tree = self.fallback.propose(seqs, max_tokens, sampling, generators)
        rows = []
        for r in range(tree.batch):
            mine, chain = tree.row(r), first.row(r)
            if mine.is_tree and chain.length:
                tokens, parents, scores = graft_chain(
                    mine.tokens[0], mine.parents[0], mine.confidence[0], chain.tokens[0], chain.confidence[0]
                )
                mine = DraftProposal(
                    tokens.unsqueeze(0), None, scores.unsqueeze(0), tree.forwards, None, parents.unsqueeze(0)
                ).truncate(max_tokens)
            mine.sources = [self.fallback.name]
            rows.append(mine)
        return DraftProposal.stack(rows, tree.forwards)


def pair_drafter(primary: Drafter, fallback: Drafter) -> Drafter:
    """``primary`` first and ``fallback`` beside it: a :class:`GraftDrafter` when ``fallback`` drafts
    trees, else a :class:`FallbackDrafter`."""
    return GraftDrafter(primary, fallback) if fallback.tree_width > 1 else FallbackDrafter(primary, fallback)
