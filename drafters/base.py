"""The drafter protocol: what every drafter (diffusion, autoregressive, prompt lookup) offers the
one generate loop.

Life cycle for one sequence::

    drafter.bind(target, tokenizer)          # once, when paired with a target (checks compatibility)
    drafter.begin(input_ids, features)       # after the target's prefill
    loop:
        proposal = drafter.propose(input_ids, k, sampling, generator)
        ...the verifier commits some tokens...
        drafter.commit(input_ids, features)  # resynchronise with the committed sequence

``input_ids`` is always the whole committed sequence (B, T). ``features`` are the target's hidden
states of the layers in ``drafter.target_layer_ids`` (concatenated on the last axis) for the
positions the target has just written to its KV cache: after prefill every committed token but the
last; after a verify step the previous last token plus the accepted drafts. Drafters that declare
no layers get ``None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from verify.sampling import SamplingParams


@dataclass
class DraftProposal:
    """Up to k proposed tokens per row.

    tokens: (B, k) long. q: (B, k, V) float, the distribution each token was drawn from (``None``
    when the drafter has none: the verifier then uses match acceptance). confidence: (B, k) in
    [0, 1], the drafter's belief that the token will be accepted (for block-length policies).
    forwards: how many drafter forward passes produced it. source: which part of a composite
    drafter made it (``None`` for a single drafter): policies keep their statistics per source.
    parents: ``None`` for a chain (token i follows token i-1); else a draft *tree*, (k,) long with
    ``parents[i]`` the index of token i's parent and -1 for a child of the last committed token, in
    topological order (see :mod:`verify.tree`). A tree carries no q (its candidates are
    deterministic: the verifier uses :func:`verify.tree.sampling_tree_accept`), and its
    confidence[i] is the drafter's probability of token i given its parent's path.
    """

    tokens: torch.Tensor
    q: torch.Tensor | None
    confidence: torch.Tensor
    forwards: int = 0
    source: str | None = None
    parents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.parents is not None:
            if self.q is not None:
                raise ValueError("a draft tree carries no q: its candidates must be deterministic")
            if self.parents.shape != self.tokens.shape[1:]:
                raise ValueError(f"parents {tuple(self.parents.shape)} must have one entry per drafted token {tuple(self.tokens.shape)}")

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> "DraftProposal":
        return cls(
            tokens=torch.zeros((batch, 0), dtype=torch.long, device=device), q=None,
            confidence=torch.zeros((batch, 0), device=device),
        )

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    @property
    def depth(self) -> int:
        """Drafts on the longest path: a chain's length, a tree's depth."""
        if self.parents is None or not self.length:
            return self.length
        from verify.tree import tree_depths

        return int(tree_depths(self.parents).max()) + 1

    def limit_depth(self, depth: int) -> "DraftProposal":
        """Drop every token more than ``depth`` drafts deep (a chain keeps its first ``depth``)."""
        if self.parents is None:
            return self.truncate(depth)
        from verify.tree import reindex, tree_depths

        keep = tree_depths(self.parents) < depth
        if bool(keep.all()):
            return self
        index = keep.nonzero().flatten()  # parents of kept nodes are kept: they are shallower
        return DraftProposal(self.tokens[:, index], None, self.confidence[:, index], self.forwards, self.source,
                             reindex(self.parents, index))

    def truncate(self, k: int) -> "DraftProposal":
        """The first k tokens (a valid proposal on its own: a tree's nodes come after their parents)."""
        if k >= self.length:
            return self
        return DraftProposal(self.tokens[:, :k], None if self.q is None else self.q[:, :k], self.confidence[:, :k], self.forwards,
                             self.source, None if self.parents is None else self.parents[:k])


class Drafter(ABC):
    """Base class of every drafter. Subclasses implement :meth:`propose`; the rest has defaults."""

    #: indices into the target's ``hidden_states`` tuple (0 = embeddings, i = output of layer i).
    target_layer_ids: tuple[int, ...] = ()
    #: short name used in stats, CLI and benchmarks.
    name: str = "drafter"

    #: m > 1 when the drafter proposes draft trees of m candidates per position: ``max_tokens`` then
    #: counts tree nodes, not depth (the loop caps the depth itself)
    tree_width: int = 1

    @property
    def vocab_size(self) -> int | None:
        """Size of the id space the drafter proposes from; ``None`` when it copies ids (prompt lookup)."""
        return None

    def bind(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Pair with a target: check compatibility, move to its device. Raises ValueError on mismatch."""
        check_vocab_compatible(self.vocab_size, target, self.name)

    def begin(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        """Start a new sequence after the target's prefill."""

    def attach_gate(self, gate: Callable[[str], bool] | None) -> None:
        """Receive the block-length policy's ``should_draft(source)``: a composite drafter asks it
        before running a costly part. Single drafters ignore it (the policy gates them as a whole)."""

    @abstractmethod
    def propose(
        self, input_ids: torch.Tensor, max_tokens: int, sampling: SamplingParams, generator: torch.Generator | None
    ) -> DraftProposal:
        """Propose up to ``max_tokens`` tokens following ``input_ids`` (B, T)."""

    def commit(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        """Resynchronise after the verifier committed tokens; ``input_ids`` is the new committed sequence."""


def target_vocab_size(target: PreTrainedModel) -> int:
    """Rows of the target's output embedding (the id space its logits cover)."""
    head = target.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(target.config.vocab_size)


def check_vocab_compatible(drafter_vocab: int | None, target: PreTrainedModel, drafter_name: str) -> None:
    if drafter_vocab is None:
        return
    tv = target_vocab_size(target)
    if drafter_vocab != tv:
        raise ValueError(
            f"Tokenizer/vocabulary mismatch: drafter '{drafter_name}' proposes ids from a vocabulary of "
            f"{drafter_vocab} tokens but the target's has {tv}. A drafter must share the target's tokenizer."
        )


class NullDrafter(Drafter):
    """Proposes nothing: every cycle is one plain autoregressive step of the target (the baseline)."""

    name = "none"

    def propose(self, input_ids, max_tokens, sampling, generator) -> DraftProposal:
        return DraftProposal.empty(input_ids.shape[0], input_ids.device)
