"""The verifier: runs the target, ONE forward per cycle over every active row's [last committed
token, drafts...], applies an acceptance rule per row, and keeps each row's accepted positions in
the target's position-indexed cache (:mod:`dllm_spec.verify.kv_cache`). A draft tree (:mod:`dllm_spec.verify.tree`) is
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

from dllm_spec.verify.acceptance import (
    AcceptResult,
    block_verification_accept,
    choice_accept,
    greedy_accept,
    match_accept,
    speculative_sampling_accept,
)
from dllm_spec.verify.keyed import NoiseKeys, keyed_sample
from dllm_spec.verify.kv_cache import StaticKVCache
from dllm_spec.verify.proposal import DraftProposal
from dllm_spec.verify.sampling import SamplingParams, probs_from_logits, warp_logits
from dllm_spec.verify.tree import ancestor_mask, check_parents, follow_choices, sampling_tree_accept, tree_depths

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


#: padding a prefill group may add, as a fraction of its tokens, beyond :data:`PREFILL_SLACK` tokens
PREFILL_WASTE = 0.25
#: padded tokens any prefill group may carry (short prompts share one forward)
PREFILL_SLACK = 256


def prefill_groups(counts: list[int]) -> list[list[int]]:
    """Indices into ``counts`` (tokens per prompt) in groups, longest first, that each run as one
    right-padded forward: a group grows while padding it to its longest member adds at most
    ``PREFILL_WASTE`` of its tokens plus ``PREFILL_SLACK``. Padding the prompts of a real batch
    (36 to 991 tokens) to the longest computed 5.4x their tokens."""
    groups: list[list[int]] = []
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if groups:
            group = groups[-1]
            tokens = sum(counts[j] for j in group) + counts[i]
            if counts[group[0]] * (len(group) + 1) <= (1 + PREFILL_WASTE) * tokens + PREFILL_SLACK:
                group.append(i)
                continue
        groups.append([i])
    return groups


def _pad_rows(rows: list[torch.Tensor], width: int, fill: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Stack 1-D long tensors into (B, width); a row shorter than width is filled from ``fill`` (width,)."""
    out = (
        torch.zeros((len(rows), width), dtype=torch.long, device=device)
        if fill is None
        else fill.expand(len(rows), width).clone()
    )
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
            tree the tree walk of :mod:`dllm_spec.verify.tree` in both.
        max_batch: rows the cache holds.
        capacity: initial positions per row (the cache grows on demand).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layer_ids: tuple[int, ...] = (),
        mode: VerificationMode = "token",
        max_batch: int = 1,
        capacity: int = 256,
    ) -> None:
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
        return self.model(
            input_ids=feed,
            cache=self.cache,
            use_cache=True,
            attention_mask=mask,
            position_ids=self.cache.positions(offsets),
            output_hidden_states=bool(self.layer_ids),
            **kwargs,
        )

    # ---- sequences in and out -------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self, prompts: list[torch.Tensor], rows: list[int] | None = None
    ) -> tuple[list[int], torch.Tensor | None, list[int]]:
        """Start sequences: cache every token of each prompt (T_i,) but the last. Prompts of similar
        length share a forward (:func:`prefill_groups`: a short prompt is never padded to a long
        one's length); identical prompts (the samples of one prompt) are run once and their cache
        rows copied.

        ``rows``: the slots to (re)use; ``None`` appends new rows to the active batch. Returns the
        rows, their features (b, max T_i - 1, F) zero-padded (or None) and the valid counts T_i - 1."""
        if rows is None:
            rows = self.cache.add_rows(len(prompts))
        else:
            self.cache.start_rows(rows)
        counts = [int(p.numel()) - 1 for p in prompts]
        if max(counts) <= 0:
            return rows, None, counts
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(p.tolist()), i) for i, p in enumerate(prompts)]  # the prompt each row copies
        unique = [i for i in sorted(set(source)) if counts[i] > 0]
        features = None
        for group in prefill_groups([counts[i] for i in unique]):
            members = [unique[g] for g in group]
            out_features = self._prefill_group([prompts[i] for i in members], [rows[i] for i in members])
            if out_features is not None:
                if features is None:
                    features = out_features.new_zeros((len(prompts), max(counts), out_features.shape[-1]))
                for j, i in enumerate(members):
                    features[i, : counts[i]] = out_features[j, : counts[i]]
        copies = [i for i in range(len(prompts)) if source[i] != i]
        self.cache.copy_rows([rows[source[i]] for i in copies], [rows[i] for i in copies])
        if features is not None and copies:
            features[copies] = features[[source[i] for i in copies]]  # (copies, n, F)
        return rows, features, counts

    def _prefill_group(self, prompts: list[torch.Tensor], rows: list[int]) -> torch.Tensor | None:
        """One forward over all but the last token of each prompt, right-padded to the longest, into
        cache ``rows``; returns the features (g, n, F) or None."""
        device = self.model.device
        counts = [int(p.numel()) - 1 for p in prompts]
        n = max(counts)
        feed = _pad_rows([p[:-1].to(device) for p in prompts], n, None, device)  # (g, n), right-padded
        self.cache.plan(n, rows)
        causal = torch.ones((n, n), dtype=torch.bool, device=device).tril()
        out = self._run(feed, causal, torch.arange(n, device=device), logits=False)
        self.cache.advance(counts, rows)
        return self._features(out)

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
        keys: NoiseKeys | None = None,
    ) -> VerifyOutcome:
        """One target forward over [last_tokens (B,), proposal.tokens (B, k)] for every active row;
        accept per row; keep what each row accepted.

        ``banned_ids`` / ``banned_until``: the target may not produce these ids (logits -inf, like
        transformers' ``min_new_tokens``) at row r's first ``banned_until[r]`` new positions (a tree
        node's position is its depth), so acceptance runs against that processed distribution.
        ``keys``: each row's seed and next position, required for reproducible sampling."""
        b = self.cache.batch
        if last_tokens.shape[0] != b or proposal.batch != b:
            raise ValueError(
                f"the verifier holds {b} rows, got {last_tokens.shape[0]} last tokens and {proposal.batch} proposal rows"
            )
        if sampling.keyed and keys is None:
            raise ValueError("reproducible sampling needs each row's noise keys")
        tree = proposal.is_tree and proposal.length > 0
        block, offsets = _layout(proposal, tree, last_tokens.device)
        feed = torch.cat([last_tokens.reshape(b, 1), proposal.tokens], dim=1)  # (B, k+1)
        self.cache.plan(proposal.length + 1)
        out = self._run(feed, block, offsets, logits=True)
        logits = _ban(out.logits, offsets, banned_ids, banned_until)  # (B, k+1, V)
        if sampling.greedy or sampling.keyed:
            choice = _choices(logits, sampling, keys, offsets)  # (B, k+1): the target's own token at every row
            accepted, next_tokens, paths = (
                _accept_tree_by_choice(proposal, choice) if tree else _accept_chain_by_choice(proposal, choice)
            )
        else:
            gens = generators if isinstance(generators, list) else [generators] * b
            accepted, next_tokens, paths = (_accept_tree_by_sampling if tree else _accept_chain_by_sampling)(
                proposal, logits, sampling, gens, self.mode
            )
        return self._keep(proposal, out, accepted, next_tokens, paths, tree)

    def _keep(
        self,
        proposal: DraftProposal,
        out,
        accepted: list[int],
        next_tokens: list[int],
        paths: list[torch.Tensor] | None,
        tree: bool,
    ) -> VerifyOutcome:
        """Commit each row's accepted positions in the cache (a tree's path gathered into place) and
        collect the drafter's features of them."""
        b, device = proposal.batch, proposal.tokens.device
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
        return VerifyOutcome(
            accepted, torch.tensor(next_tokens, dtype=torch.long, device=device), tokens, path_t, features
        )


def _layout(proposal: DraftProposal, tree: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The block attention mask ((k+1, k+1), or (B, k+1, k+1) per-row tree masks) and each fed
    token's offset after the root ((k+1,), or (B, k+1) tree depths + 1, the root 0)."""
    k = proposal.length
    if not tree:
        return torch.ones((k + 1, k + 1), dtype=torch.bool, device=device).tril(), torch.arange(k + 1, device=device)
    per_row = [proposal.parents[r] for r in range(proposal.batch)]
    for r in range(proposal.batch):
        check_parents(proposal.row_parents(r))
    block = torch.stack([ancestor_mask(p.cpu()) for p in per_row]).to(device)  # (B, k+1, k+1)
    offsets = torch.stack(
        [torch.cat([torch.zeros(1, dtype=torch.long), tree_depths(p.cpu()) + 1]) for p in per_row]
    ).to(device)
    return block, offsets


def _ban(
    logits: torch.Tensor, offsets: torch.Tensor, banned_ids: list[int] | None, banned_until: list[int] | None
) -> torch.Tensor:
    """Logits (B, k+1, V) with ``banned_ids`` at -inf (the dtype's min) where a row's new-token index
    (its offset) is below ``banned_until[r]``."""
    if not (banned_ids and banned_until and any(banned_until)):
        return logits
    b, width = logits.shape[:2]
    depth = offsets.expand(b, width)  # (B, k+1): new-token index each logits row predicts
    rows_hit = depth < torch.tensor(banned_until, device=logits.device)[:, None]  # (B, k+1)
    ids = torch.tensor(banned_ids, device=logits.device)
    logits = logits.clone()
    logits[..., ids] = torch.where(rows_hit[..., None], torch.finfo(logits.dtype).min, logits[..., ids])
    return logits


def _choices(
    logits: torch.Tensor, sampling: SamplingParams, keys: NoiseKeys | None, offsets: torch.Tensor
) -> torch.Tensor:
    """The target's own token at every fed position (B, k+1): the argmax when greedy, the keyed
    Gumbel-max sample of the warped logits in reproducible sampling."""
    if sampling.greedy:
        return logits.argmax(-1)
    b, width, vocab = logits.shape
    seeds, positions = keys.at(offsets.expand(b, width))  # (B*(k+1),) each
    warped = warp_logits(logits.reshape(b * width, vocab), sampling)  # (B*(k+1), V)
    return keyed_sample(warped, seeds, positions).view(b, width)


def _accept_chain_by_choice(proposal: DraftProposal, choice: torch.Tensor) -> tuple[list[int], list[int], None]:
    result = choice_accept(proposal.tokens, choice, torch.tensor(proposal.lengths, device=choice.device))
    return result.num_accepted.tolist(), result.next_token.tolist(), None


def _accept_tree_by_choice(
    proposal: DraftProposal, choice: torch.Tensor
) -> tuple[list[int], list[int], list[torch.Tensor]]:
    rows = choice.tolist()
    results = [
        follow_choices(proposal.tokens[r, :n], proposal.parents[r, :n], rows[r]) for r, n in enumerate(proposal.lengths)
    ]
    return [int(x.path.numel()) for x in results], [x.next_token for x in results], [x.path for x in results]


def _accept_chain_by_sampling(
    proposal: DraftProposal, logits: torch.Tensor, sampling: SamplingParams, gens: list, mode: VerificationMode
) -> tuple[list[int], list[int], None]:
    """Rejection sampling row by row (each row with its own generator and draft length)."""
    accepted, next_tokens = [], []
    for r, n in enumerate(proposal.lengths):
        res = accept(proposal.row(r), logits[r : r + 1, : n + 1], sampling, gens[r], mode)
        accepted.append(int(res.num_accepted[0]))
        next_tokens.append(int(res.next_token[0]))
    return accepted, next_tokens, None


def _accept_tree_by_sampling(
    proposal: DraftProposal, logits: torch.Tensor, sampling: SamplingParams, gens: list, mode: VerificationMode
) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """SpecInfer's sequential candidate tests, row by row."""
    results = [
        sampling_tree_accept(
            proposal.tokens[r, :n], proposal.parents[r, :n], probs_from_logits(logits[r, : n + 1], sampling), gens[r]
        )
        for r, n in enumerate(proposal.lengths)
    ]
    return [int(x.path.numel()) for x in results], [x.next_token for x in results], [x.path for x in results]
