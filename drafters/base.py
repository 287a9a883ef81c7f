"""The drafter protocol: what every drafter (diffusion, autoregressive, prompt lookup) offers the
one generate loop, for a batch of sequences that start, grow and finish at their own pace.

Life cycle::

    drafter.bind(target, tokenizer)                  # once, when paired with a target (checks compatibility)
    drafter.begin(rows, seqs, features, counts)      # new sequences took slots ``rows`` (after their prefill)
    loop:
        proposal = drafter.propose(seqs, k, sampling, generators)   # one row per active sequence
        ...the verifier commits some tokens per row...
        drafter.commit(seqs, features, counts)       # resynchronise every active row
        drafter.reorder(index)                       # finished rows leave: new row i = old row index[i]

``seqs`` (:class:`Sequences`) holds every active row's whole committed sequence. ``features`` are
the target's hidden states of the layers in ``drafter.target_layer_ids`` (concatenated on the last
axis), (b, n, F) padded, for the positions the target has just written to its cache, ``counts[i]``
valid in row i: after prefill every committed token but the last; after a verify step the previous
last token plus the accepted drafts. Drafters that declare no layers get ``None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.verify.keyed import NoiseKeys
from dllm_spec.verify.proposal import DraftProposal
from dllm_spec.verify.sampling import SamplingParams

__all__ = ["Drafter", "DraftProposal", "NullDrafter", "Sequences", "check_vocab_compatible", "target_vocab_size"]


@dataclass
class Sequences:
    """The committed tokens of the active rows: ``ids`` (max_batch, capacity) long, row r's sequence
    ``ids[r, :lengths[r]]``; rows ``0 .. batch-1`` are active. ``keys``: in reproducible sampling,
    each row's seed and next position (:class:`dllm_spec.verify.keyed.NoiseKeys`): a drafter that
    perturbs its logits with the same noise proposes what the target will sample."""

    ids: torch.Tensor
    lengths: list[int]
    keys: NoiseKeys | None = None

    @classmethod
    def from_tensor(cls, input_ids: torch.Tensor) -> "Sequences":
        """A batch of equal-length rows (B, T)."""
        return cls(input_ids, [int(input_ids.shape[1])] * int(input_ids.shape[0]))

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def row(self, r: int) -> torch.Tensor:
        """Row r's committed sequence (T_r,)."""
        return self.ids[r, : self.lengths[r]]

    def last(self) -> torch.Tensor:
        """(B,) each row's last committed token."""
        index = torch.tensor([n - 1 for n in self.lengths], device=self.ids.device)
        return self.ids[: self.batch].gather(1, index[:, None]).squeeze(1)

    def tail(self, r: int, n: int) -> torch.Tensor:
        return self.ids[r, max(0, self.lengths[r] - n) : self.lengths[r]]


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

    def kernel_modules(self) -> list[nn.Module]:
        """The modules that run this drafter's own matmuls, after :meth:`bind`: the engine swaps the
        linears inside them for the target's CPU kernels (``dllm_spec.kernels``), so each is a
        container, not a bare ``nn.Linear``. Modules shared with the target are left out (they have
        the kernels already); none by default."""
        return []

    def begin(self, rows: list[int], seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        """Sequences start in slots ``rows`` after the target's prefill (``features`` row i is slot rows[i])."""

    def attach_gate(self, gate: Callable[[str], bool] | None) -> None:
        """Receive the block-length policy's ``request_draft(source)``: a composite drafter asks it
        before running a costly part. Single drafters ignore it (the policy gates them as a whole)."""

    @abstractmethod
    def propose(
        self, seqs: Sequences, max_tokens: int, sampling: SamplingParams, generators: list[torch.Generator | None]
    ) -> DraftProposal:
        """Propose up to ``max_tokens`` tokens after each active row of ``seqs`` (one proposal row each)."""

    def commit(self, seqs: Sequences, features: torch.Tensor | None, counts: list[int]) -> None:
        """Resynchronise every active row after the verifier committed tokens."""

    def reorder(self, index: list[int]) -> None:
        """Keep rows ``index`` (new row i = old row index[i]); finished rows leave the batch."""


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

    def propose(self, seqs, max_tokens, sampling, generators) -> DraftProposal:
        return DraftProposal.empty(seqs.batch, seqs.device)
