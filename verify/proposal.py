"""What a drafter hands the verifier: :class:`DraftProposal`, up to k draft tokens (or tree nodes)
per row of a batch, ragged across rows.

Shapes (B rows, k the padded width):
    tokens (B, k) long; row r's drafts are ``tokens[r, :lengths[r]]``, the rest is padding.
    q (B, k, V) float or None: the distribution each token was drawn from (None: deterministic
        drafts, the verifier uses match acceptance).
    confidence (B, k): the drafter's belief that a token is accepted given its parent was.
    parents (B, k) long or None: None for chains (token i follows token i-1); else each row is a
        draft tree in topological order (:mod:`dllm_spec.verify.tree`), ``-1`` for a child of the row's last
        committed token. A tree carries no q (its candidates are deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dllm_spec.verify.tree import reindex, tree_depths


@dataclass
class DraftProposal:
    """Up to k proposed tokens per row (see the module docstring for shapes).

    forwards: drafter forward passes that produced it. sources: per row, which part of a composite
    drafter made it (``None`` for a single drafter): policies keep statistics per source.
    """

    tokens: torch.Tensor
    q: torch.Tensor | None
    confidence: torch.Tensor
    forwards: int = 0
    source: str | None = None
    parents: torch.Tensor | None = None
    lengths: list[int] = field(default=None)  # type: ignore[assignment]
    sources: list[str | None] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"draft tokens must be (B, k), got shape {tuple(self.tokens.shape)}")
        batch, k = self.tokens.shape
        if self.parents is not None:
            if self.q is not None:
                raise ValueError("a draft tree carries no q: its candidates must be deterministic")
            if self.parents.dim() == 1:
                self.parents = self.parents.unsqueeze(0).expand(batch, -1)
            if self.parents.shape != self.tokens.shape:
                raise ValueError(
                    f"parents {tuple(self.parents.shape)} must have one entry per drafted token {tuple(self.tokens.shape)}"
                )
        if self.lengths is None:
            self.lengths = [k] * batch
        if len(self.lengths) != batch or any(not 0 <= n <= k for n in self.lengths):
            raise ValueError(f"lengths {self.lengths} must give each of the {batch} rows a count in [0, {k}]")
        if self.sources is None:
            self.sources = [self.source] * batch

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        """The padded width k (the longest row)."""
        return int(self.tokens.shape[1])

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    def row_parents(self, r: int) -> torch.Tensor:
        """Row r's tree parents (n_r,), or a chain's [-1, 0, ...]."""
        n = self.lengths[r]
        if self.parents is None:
            return torch.arange(-1, n - 1, device=self.tokens.device)
        return self.parents[r, :n]

    def row_depth(self, r: int) -> int:
        """Drafts on row r's longest path: a chain's length, a tree's depth."""
        n = self.lengths[r]
        if self.parents is None or n == 0:
            return n
        return int(tree_depths(self.parents[r, :n]).max()) + 1

    @property
    def depth(self) -> int:
        return max((self.row_depth(r) for r in range(self.batch)), default=0)

    @classmethod
    def empty(cls, batch: int, device: torch.device | str) -> "DraftProposal":
        return cls(
            tokens=torch.zeros((batch, 0), dtype=torch.long, device=device),
            q=None,
            confidence=torch.zeros((batch, 0), device=device),
        )

    # ---- rows ------------------------------------------------------------------------------------
    def row(self, r: int) -> "DraftProposal":
        """Row r alone, unpadded: a (1, n_r) proposal."""
        n = self.lengths[r]
        return DraftProposal(
            self.tokens[r : r + 1, :n],
            None if self.q is None else self.q[r : r + 1, :n],
            self.confidence[r : r + 1, :n],
            self.forwards,
            self.sources[r],
            None if self.parents is None else self.parents[r : r + 1, :n],
        )

    @classmethod
    def stack(cls, rows: list["DraftProposal"], forwards: int | None = None) -> "DraftProposal":
        """Pad single-row proposals to one batch. A tree row makes the batch a tree (a chain row is the
        tree [-1, 0, 1, ...]). When some chain rows carry q, a row without q gets the one-hot of its
        deterministic drafts, which speculative sampling treats exactly as match acceptance."""
        if not rows:
            raise ValueError("stack() needs at least one row")
        device = rows[0].tokens.device
        k = max(p.length for p in rows)
        tree = any(p.is_tree for p in rows)
        with_q = any(p.q is not None and p.length for p in rows) and not tree
        b = len(rows)
        tokens = torch.zeros((b, k), dtype=torch.long, device=device)
        confidence = torch.zeros((b, k), device=device)
        parents = torch.full((b, k), -1, dtype=torch.long, device=device) if tree else None
        q = None
        if with_q and k:
            vocab = next(p.q.shape[-1] for p in rows if p.q is not None and p.length)
            ref = next(p.q for p in rows if p.q is not None and p.length)
            q = torch.zeros((b, k, vocab), dtype=ref.dtype, device=device)
        for r, p in enumerate(rows):
            n = p.length
            if n == 0:
                continue
            tokens[r, :n] = p.tokens[0]
            confidence[r, :n] = p.confidence[0].to(confidence.dtype)
            if tree:
                parents[r, :n] = p.row_parents(0)
            if q is not None:
                q[r, :n] = (
                    p.q[0] if p.q is not None else torch.nn.functional.one_hot(p.tokens[0], q.shape[-1]).to(q.dtype)
                )
        sources = [p.sources[0] for p in rows]
        return cls(
            tokens,
            q,
            confidence,
            max(p.forwards for p in rows) if forwards is None else forwards,
            sources[0] if len(set(sources)) == 1 else None,
            parents,
            [p.length for p in rows],
            sources,
        )

    # ---- cutting -----------------------------------------------------------------------------------
    def truncate(self, k: int | list[int]) -> "DraftProposal":
        """The first k tokens of each row (``k`` one count for all rows or one per row). A tree's
        first nodes form a tree, so trees truncate like chains."""
        ks = [k] * self.batch if isinstance(k, int) else list(k)
        lengths = [max(0, min(n, c)) for n, c in zip(self.lengths, ks)]
        if lengths == self.lengths and max(lengths, default=0) == self.length:
            return self
        width = max(lengths, default=0)
        return DraftProposal(
            self.tokens[:, :width],
            None if self.q is None else self.q[:, :width],
            self.confidence[:, :width],
            self.forwards,
            self.source,
            None if self.parents is None else self.parents[:, :width],
            lengths,
            list(self.sources),
        )

    def limit_depth(self, depth: int | list[int]) -> "DraftProposal":
        """Drop every token more than ``depth`` drafts deep (one limit, or one per row)."""
        limits = [depth] * self.batch if isinstance(depth, int) else list(depth)
        if self.parents is None:
            return self.truncate(limits)
        if all(self.row_depth(r) <= limits[r] for r in range(self.batch)):
            return self
        rows = []
        for r in range(self.batch):
            one = self.row(r)
            if one.length:
                keep = tree_depths(one.parents[0]) < limits[r]
                index = keep.nonzero().flatten()  # parents of kept nodes are kept: they are shallower
                one = DraftProposal(
                    one.tokens[:, index],
                    None,
                    one.confidence[:, index],
                    one.forwards,
                    one.sources[0],
                    reindex(one.parents[0], index).unsqueeze(0),
                )
            rows.append(one)
        return DraftProposal.stack(rows, self.forwards)
