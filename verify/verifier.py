"""The verifier: runs the target, ONE forward per cycle over every active row's [last committed
token, drafts...], applies an acceptance rule per row, and keeps each row's accepted positions in
the target's position-indexed cache (:mod:`verify.kv_cache`). A draft tree (:mod:`verify.tree`) is
verified in the same one forward under a per-row tree attention mask; its accepted path is then
gathered into place within the row.

Glossary:
    B: active rows; k: the proposal's padded width; n_r: drafts row r accepted (ragged).
    root: a row's last committed token, fed first.

Cache invariant (checked by the tests): row r's cache holds every committed token of the row except
the last one, which is fed at the start of the next verify forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from verify.acceptance import (
    AcceptResult,
    block_verification_accept,
    greedy_accept,
    match_accept,
    speculative_sampling_accept,
)
from verify.kv_cache import StaticKVCache
from verify.proposal import DraftProposal
from verify.sampling import SamplingParams, probs_from_logits
from verify.tree import ancestor_mask, check_parents, follow_choices, sampling_tree_accept, tree_depths

VerificationMode = Literal["token", "block"]


@dataclass
class VerifyOutcome:
    """Per row: ``num_accepted[r]`` drafts accepted (host ints), ``next_token`` (B,) the target's own
    token after them, ``tokens`` (B, m) the accepted drafts (padded, m = max accepted), ``paths``
    (B, m) their indices in the proposal (a chain's 0..n-1), and ``features`` (B, m+1, F) the
    drafter's target features of the positions now cached (the root and the accepted drafts; row r's
    first ``num_accepted[r] + 1`` are valid), or None."""

    num_accepted: list[int]
    next_token: torch.Tensor
    tokens: torch.Tensor
    paths: torch.Tensor
    features: torch.Tensor | None

    @property
    def feature_counts(self) -> list[int]:
        return [n + 1 for n in self.num_accepted]


def accept(
    proposal: DraftProposal,
    target_logits: torch.Tensor,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    mode: VerificationMode = "token",
) -> AcceptResult:
    """Pick the acceptance rule for a chain: greedy match at temperature 0; otherwise speculative
    sampling (token-level or block verification) when the drafter gave q, match acceptance when it
    did not (for block mode a missing q is the one-hot of the deterministic draft)."""
    if sampling.greedy:
        return greedy_accept(proposal.tokens, target_logits)
    p = probs_from_logits(target_logits, sampling)  # (B, k+1, V)
    q = proposal.q
    if mode == "block":
        if q is None:
            q = torch.nn.functional.one_hot(proposal.tokens, p.shape[-1]).float()
        return block_verification_accept(proposal.tokens, q, p, generator)
    if q is None:
        return match_accept(proposal.tokens, p, generator)
    return speculative_sampling_accept(proposal.tokens, q, p, generator)


def _pad_rows(rows: list[torch.Tensor], width: int, fill: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Stack 1-D long tensors into (B, width); a row shorter than width is filled from ``fill`` (width,)."""
    out = torch.zeros((len(rows), width), dtype=torch.long, device=device) if fill is None else fill.expand(len(rows), width).clone()
    for r, t in enumerate(rows):
        out[r, : t.numel()] = t
    return out


class Verifier:
    """Owns the target's KV cache for a batch of up to ``max_batch`` sequences.

    Args:
        model: the target causal LM (any transformers decoder-only model).
        layer_ids: indices into ``hidden_states`` (0 = embeddings) whose states are returned,
            concatenated on the last axis, for the drafter; empty for none.
        mode: ``"token"`` (Leviathan/Chen speculative sampling) or ``"block"`` (Sun et al. block
            verification). Greedy decoding uses exact argmax matching in both modes, and a draft
            tree the tree walk of :mod:`verify.tree` in both.
        max_batch: rows the cache holds.
        capacity: initial positions per row (the cache grows on demand).
    """

    def __init__(self, model: PreTrainedModel, layer_ids: tuple[int, ...] = (), mode: VerificationMode = "token",
                 max_batch: int = 1, capacity: int = 256) -> None:
        if mode not in ("token", "block"):
            raise ValueError(f"verification mode must be 'token' or 'block', got {mode!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.layer_ids = tuple(layer_ids)
        self.mode = mode
        self.cache = StaticKVCache.for_model(model, max_batch, capacity)

    @property
    def batch(self) -> int:
        return self.cache.batch

    def _features(self, out) -> torch.Tensor | None:
        if not self.layer_ids:
            return None
        return torch.cat([out.hidden_states[i] for i in self.layer_ids], dim=-1)

    def _run(self, feed: torch.Tensor, block: torch.Tensor, offsets: torch.Tensor, logits: bool):
        """One forward of ``feed`` (b, n) at the planned positions (the cache was planned for n)."""
        mask = self.cache.attention_mask(block, self.model.dtype)
        kwargs = {"logits_to_keep": 1} if not logits else {}
        return self.model(input_ids=feed, cache=self.cache, use_cache=True, attention_mask=mask,
                          position_ids=self.cache.positions(offsets), output_hidden_states=bool(self.layer_ids), **kwargs)

    # ---- sequences in and out -------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[torch.Tensor], rows: list[int] | None = None) -> tuple[list[int], torch.Tensor | None, list[int]]:
        """Start sequences: cache every token of each prompt (T_i,) but the last, in one forward.

        ``rows``: the slots to (re)use; ``None`` appends new rows to the active batch. Returns the
        rows, their features (b, max T_i - 1, F) padded (or None) and the valid counts T_i - 1."""
        if rows is None:
            rows = self.cache.add_rows(len(prompts))
        else:
            self.cache.start_rows(rows)
        counts = [int(p.numel()) - 1 for p in prompts]
        n = max(counts)
        if n <= 0:
            return rows, None, counts
        device = self.model.device
        feed = _pad_rows([p[:-1].to(device) for p in prompts], n, None, device)  # (b, n), right-padded
        self.cache.plan(n, rows)
        causal = torch.ones((n, n), dtype=torch.bool, device=device).tril()
        out = self._run(feed, causal, torch.arange(n, device=device), logits=False)
        self.cache.advance(counts, rows)
        return rows, self._features(out), counts

    def reset(self) -> None:
        """Drop every row (a new batch starts)."""
        self.cache.reorder([])

    def reorder(self, index: list[int]) -> None:
        """Keep rows ``index`` (new row i = old row index[i]): finished rows leave the batch."""
        self.cache.reorder(index)

    # ---- one cycle ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def verify(
        self,
        last_tokens: torch.Tensor,
        proposal: DraftProposal,
        sampling: SamplingParams,
        generators: list[torch.Generator | None] | torch.Generator | None,
        banned_ids: list[int] | None = None,
        banned_until: list[int] | None = None,
    ) -> VerifyOutcome:
        """One target forward over [last_tokens (B,), proposal.tokens (B, k)] for every active row;
        accept per row; keep what each row accepted.

        ``banned_ids`` / ``banned_until``: the target may not produce these ids (logits -inf, like
        transformers' ``min_new_tokens``) at row r's first ``banned_until[r]`` new positions (a tree
        node's position is its depth), so acceptance runs against that processed distribution."""
        b = self.cache.batch
        if last_tokens.shape[0] != b or proposal.batch != b:
            raise ValueError(f"the verifier holds {b} rows, got {last_tokens.shape[0]} last tokens and {proposal.batch} proposal rows")
        gens = generators if isinstance(generators, list) else [generators] * b
        device = last_tokens.device
        k = proposal.length
        feed = torch.cat([last_tokens.reshape(b, 1), proposal.tokens], dim=1)  # (B, k+1)
        tree = proposal.is_tree and k > 0
        if tree:
            per_row = [proposal.parents[r] for r in range(b)]
            for r in range(b):
                check_parents(proposal.row_parents(r))
            block = torch.stack([ancestor_mask(p.cpu()) for p in per_row]).to(device)  # (B, k+1, k+1)
            offsets = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), tree_depths(p.cpu()) + 1]) for p in per_row]).to(device)
        else:
            block = torch.ones((k + 1, k + 1), dtype=torch.bool, device=device).tril()
            offsets = torch.arange(k + 1, device=device)
        self.cache.plan(k + 1)
        out = self._run(feed, block, offsets, logits=True)
        logits = out.logits  # (B, k+1, V)
        if banned_ids and banned_until and any(banned_until):
            depth = offsets.expand(b, k + 1)  # (B, k+1): new-token index each logits row predicts
            until = torch.tensor(banned_until, device=device)[:, None]
            rows_hit = depth < until  # (B, k+1)
            ids = torch.tensor(banned_ids, device=device)
            logits = logits.clone()
            logits[..., ids] = torch.where(rows_hit[..., None], torch.finfo(logits.dtype).min, logits[..., ids])

        lengths = proposal.lengths
        paths: list[torch.Tensor] = []
        next_tokens: list[int] = []
        if tree:
            choice = logits.argmax(-1).tolist() if sampling.greedy else None
            for r in range(b):
                n_r = lengths[r]
                toks, parents = proposal.tokens[r, :n_r], proposal.parents[r, :n_r]
                if sampling.greedy:
                    res = follow_choices(toks, parents, choice[r])
                else:
                    res = sampling_tree_accept(toks, parents, probs_from_logits(logits[r, : n_r + 1], sampling), gens[r])
                paths.append(res.path)
                next_tokens.append(res.next_token)
            accepted = [int(p.numel()) for p in paths]
        elif sampling.greedy:
            result = greedy_accept(proposal.tokens, logits, torch.tensor(lengths, device=device))
            accepted, next_tokens = result.num_accepted.tolist(), result.next_token.tolist()
        else:
            accepted = []
            for r in range(b):
                n_r = lengths[r]
                res = accept(proposal.row(r), logits[r: r + 1, : n_r + 1], sampling, gens[r], self.mode)
                accepted.append(int(res.num_accepted[0]))
                next_tokens.append(int(res.next_token[0]))
        m = max(accepted, default=0)
        ident = torch.arange(m, device=device)
        if tree:
            path_t = _pad_rows(paths, m, ident, device)  # (B, m); a shorter path padded with identity moves
            if m and not bool((path_t == ident).all()):
                self.cache.keep_paths(path_t)
        else:
            path_t = ident.expand(b, m)
        self.cache.advance([n + 1 for n in accepted])
        features = self._features(out)
        if features is not None:
            rows = torch.cat([torch.zeros((b, 1), dtype=torch.long, device=device), path_t + 1], dim=1)  # (B, m+1)
            features = features.gather(1, rows[:, :, None].expand(b, m + 1, features.shape[-1]))
        tokens = proposal.tokens.gather(1, path_t) if m else proposal.tokens[:, :0]
        return VerifyOutcome(accepted, torch.tensor(next_tokens, dtype=torch.long, device=device), tokens, path_t, features)
