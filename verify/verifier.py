"""The verifier: runs the target, ONE forward per cycle over [last committed token, drafts...],
applies an acceptance rule, crops the rejected positions from the target's KV cache, and returns
the target hidden states a drafter asked for. A draft tree (:mod:`verify.tree`) is verified in the
same one forward under a tree attention mask; the accepted path is then moved into place in the
cache and everything else dropped.

Cache invariant (checked by the tests): the target's cache holds every committed token except the
last one, which is fed at the start of the next verify forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from dllm_spec.cache import cache_length, crop_cache, forward_with_cache, keep_path, new_cache
from drafters.base import DraftProposal
from verify.acceptance import (
    AcceptResult,
    block_verification_accept,
    greedy_accept,
    match_accept,
    speculative_sampling_accept,
)
from verify.sampling import SamplingParams, probs_from_logits
from verify.tree import ancestor_mask, check_parents, greedy_tree_accept, sampling_tree_accept, tree_depths

VerificationMode = Literal["token", "block"]


@dataclass
class VerifyOutcome:
    """num_accepted (B,), next_token (B,); features (B, n+1, F) of the positions now cached, or None;
    tokens (B, n) the accepted drafts; path (n,) their indices in the proposal (for a chain 0..n-1)."""

    num_accepted: torch.Tensor
    next_token: torch.Tensor
    features: torch.Tensor | None
    tokens: torch.Tensor
    path: torch.Tensor


def accept(
    proposal: DraftProposal,
    target_logits: torch.Tensor,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    mode: VerificationMode = "token",
) -> AcceptResult:
    """Pick the acceptance rule: greedy match at temperature 0; otherwise speculative sampling
    (token-level or block verification) when the drafter gave q, match acceptance when it did not
    (for block mode a missing q is the one-hot of the deterministic draft)."""
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


class Verifier:
    """Owns the target's KV cache for one sequence.

    Args:
        model: the target causal LM.
        layer_ids: indices into ``hidden_states`` (0 = embeddings) whose states are returned,
            concatenated on the last axis, for the drafter; empty for none.
        mode: ``"token"`` (Leviathan/Chen speculative sampling) or ``"block"`` (Sun et al. block
            verification). Greedy decoding uses exact argmax matching in both modes, and a draft
            tree the tree walk of :mod:`verify.tree` in both.
    """

    def __init__(self, model: PreTrainedModel, layer_ids: tuple[int, ...] = (), mode: VerificationMode = "token") -> None:
        if mode not in ("token", "block"):
            raise ValueError(f"verification mode must be 'token' or 'block', got {mode!r}")
        self.model = model
        self.layer_ids = tuple(layer_ids)
        self.mode = mode
        self.cache = None

    def _features(self, out) -> torch.Tensor | None:
        if not self.layer_ids:
            return None
        return torch.cat([out.hidden_states[i] for i in self.layer_ids], dim=-1)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Cache every token of ``input_ids`` (B, T) but the last; return their features (B, T-1, F)."""
        self.cache = new_cache(self.model)
        if input_ids.shape[1] < 2:
            return None
        out = forward_with_cache(self.model, input_ids[:, :-1], self.cache, output_hidden_states=bool(self.layer_ids), logits_to_keep=1)
        return self._features(out)

    @property
    def cached_length(self) -> int:
        return 0 if self.cache is None else cache_length(self.cache)

    @torch.inference_mode()
    def verify(
        self,
        last_token: torch.Tensor,
        proposal: DraftProposal,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> VerifyOutcome:
        """One target forward over [last_token (B, 1), proposal.tokens (B, k)]; accept; crop."""
        if proposal.tokens.shape[0] != 1:
            raise ValueError("the verifier supports batch size 1 for now")
        if proposal.is_tree and proposal.length:
            return self._verify_tree(last_token, proposal, sampling, generator)
        start = self.cached_length
        feed = torch.cat([last_token, proposal.tokens], dim=1)  # (B, k+1)
        out = forward_with_cache(self.model, feed, self.cache, output_hidden_states=bool(self.layer_ids))
        result = accept(proposal, out.logits, sampling, generator, self.mode)
        n = int(result.num_accepted[0])
        crop_cache(self.cache, start + n + 1)
        features = self._features(out)
        return VerifyOutcome(result.num_accepted, result.next_token, None if features is None else features[:, : n + 1],
                             proposal.tokens[:, :n], torch.arange(n, device=feed.device))

    def _verify_tree(self, last_token: torch.Tensor, proposal: DraftProposal, sampling: SamplingParams,
                     generator: torch.Generator | None) -> VerifyOutcome:
        """[root, nodes] in one forward, each row seeing the context, the root and its ancestors."""
        parents = proposal.parents
        check_parents(parents)
        start = self.cached_length
        n_nodes = proposal.length
        device = last_token.device
        feed = torch.cat([last_token, proposal.tokens], dim=1)  # (1, N+1)
        positions = start + torch.cat([torch.zeros(1, dtype=torch.long, device=device), tree_depths(parents) + 1]).unsqueeze(0)
        dtype = self.model.dtype
        mask = torch.zeros((1, 1, n_nodes + 1, start + n_nodes + 1), dtype=dtype, device=device)
        blocked = ~ancestor_mask(parents).to(device)  # (N+1, N+1)
        mask[0, 0, :, start:].masked_fill_(blocked, torch.finfo(dtype).min)
        out = forward_with_cache(self.model, feed, self.cache, output_hidden_states=bool(self.layer_ids),
                                 attention_mask=mask, position_ids=positions)
        logits = out.logits[0]  # (N+1, V)
        if sampling.greedy:
            result = greedy_tree_accept(proposal.tokens[0], parents, logits)
        else:
            result = sampling_tree_accept(proposal.tokens[0], parents, probs_from_logits(logits, sampling), generator)
        path = result.path
        n = int(path.numel())
        keep_path(self.cache, start, path)
        features = self._features(out)
        if features is not None:
            rows = torch.cat([torch.zeros(1, dtype=torch.long, device=device), path + 1])
            features = features[:, rows]  # (1, n+1, F): the root and the accepted nodes
        return VerifyOutcome(torch.tensor([n], device=device), torch.tensor([result.next_token], device=device), features,
                             proposal.tokens[:, path], path)
