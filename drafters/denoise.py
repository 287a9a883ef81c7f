"""The few-step denoising loop shared by the masked-diffusion drafters: fill a block of masked
positions in S scheduler steps and return the proposal with the q each token was drawn from, or,
with ``tree_width`` m > 1, a draft tree grown best-first from every position's m most likely
tokens (:func:`dllm_spec.verify.tree.build_tree`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dllm_spec.drafters.base import DraftProposal
from dllm_spec.drafters.schedulers import UnmaskingScheduler
from dllm_spec.verify.keyed import NoiseKeys, keyed_candidates
from dllm_spec.verify.sampling import SamplingParams, warp_logits
from dllm_spec.verify.tree import build_tree

#: (tokens (B, L), masked (B, L)) -> logits (B, L, V): over the target vocabulary, or over the
#: draft vocabulary when ``denoise_block`` is given ``vocab`` (tokens are then draft ids too)
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def denoise_block(
    scheduler: UnmaskingScheduler,
    steps: int,
    length: int,
    logits_fn: LogitsFn,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    batch: int,
    device: torch.device,
    max_tokens: int,
    vocab: torch.Tensor | None = None,
    target_vocab_size: int | None = None,
    tree_width: int = 1,
    keys: NoiseKeys | None = None,
) -> DraftProposal:
    """Denoise ``length`` masked positions in ``steps`` steps; propose the first ``max_tokens``.

    With ``tree_width`` m > 1 the proposal is a draft tree of ``max_tokens`` nodes instead (depth
    at most ``length``): each position's m most likely tokens under the drafter's distribution at
    the step that committed it (deterministic, so the proposal has no q and the tree's
    verification is lossless at any temperature), combined best-first by path probability; the
    denoising itself commits the argmax, as the chain's does. One tree per row.

    q is returned only when it is exact (temperature > 0 and S = 1 or left-to-right unmasking: see
    :mod:`dllm_spec.drafters.schedulers`); otherwise the draft is deterministic (argmax) and q is None.

    In reproducible sampling (``sampling.keyed``, with the rows' ``keys``) every position proposes
    its best guess at the target's keyed sample: the argmax of its warped logits perturbed by the
    same Gumbel noise the target will use (:func:`dllm_spec.verify.keyed.keyed_candidates`), and a
    tree its m best such guesses; no q (verification is argmax matching on perturbed logits).

    With a reduced draft vocabulary ``vocab`` (V_draft,) of target ids, ``logits_fn`` works in draft
    ids and the scheduler over V_draft (6x less softmax/argmax work for SmolLM2's 49K vocabulary);
    the proposal is mapped back to target ids and q scattered into the ``target_vocab_size`` ids
    (zero outside the draft vocabulary: the same q as -inf logits there would give).
    """
    if tree_width < 1:
        raise ValueError(f"tree_width must be >= 1, got {tree_width}")
    tree = tree_width > 1
    keyed = keys is not None and sampling.keyed
    exact_q = (scheduler.left_to_right or steps == 1) and not tree and not keyed
    guess = _keyed_guesses(keys, sampling, length, vocab) if keyed else None
    scheduler.set_timesteps(steps, length)
    tokens = torch.zeros((batch, length), dtype=torch.long, device=device)
    masked = torch.ones((batch, length), dtype=torch.bool, device=device)
    confidence = torch.zeros((batch, length), device=device)
    q = None
    cand = cand_p = None  # (B, L, m) each position's top-m tokens and their probabilities
    for step in range(scheduler.num_inference_steps):
        logits = logits_fn(tokens, masked)
        pick = None if guess is None else (lambda lg: tuple(x[..., 0] for x in guess(lg, 1)))
        out = scheduler.step(logits, step, tokens, masked, sampling, generator, deterministic=not exact_q, pick=pick)
        confidence = torch.where(out.committed, out.confidence, confidence)
        if not sampling.greedy and exact_q:
            q = out.probs if q is None else torch.where(out.committed.unsqueeze(-1), out.probs, q)
        if tree:
            if guess is None:
                top_p, top_i = logits.float().softmax(-1).topk(min(tree_width, logits.shape[-1]), dim=-1)  # (B, L, m)
            else:
                top_i, top_p = guess(logits, tree_width)
            sel = out.committed.unsqueeze(-1)
            cand = top_i if cand is None else torch.where(sel, top_i, cand)
            cand_p = top_p if cand_p is None else torch.where(sel, top_p, cand_p)
        tokens, masked = out.tokens, out.masked
    forwards = scheduler.num_inference_steps
    if tree:
        return _tree_proposal(cand if vocab is None else vocab[cand], cand_p, max_tokens, device, forwards)
    return _chain_proposal(tokens, q, confidence, min(max_tokens, length), vocab, target_vocab_size, forwards)


def _tree_proposal(
    cand: torch.Tensor, cand_p: torch.Tensor, max_tokens: int, device: torch.device, forwards: int
) -> DraftProposal:
    """One best-first tree per row from each position's candidates (B, L, m) (target ids) and their
    probabilities, padded to the widest."""
    cand, cand_p = cand.cpu(), cand_p.cpu()  # the best-first search runs on the host: move once
    rows = []
    for r in range(cand.shape[0]):
        nodes, parents, node_probs = build_tree(cand[r], cand_p[r], max_tokens)
        rows.append(
            DraftProposal(
                nodes.unsqueeze(0).to(device),
                None,
                node_probs.unsqueeze(0).to(device),
                parents=parents.unsqueeze(0).to(device),
            )
        )
    return DraftProposal.stack(rows, forwards=forwards)


def _chain_proposal(
    tokens: torch.Tensor,
    q: torch.Tensor | None,
    confidence: torch.Tensor,
    n: int,
    vocab: torch.Tensor | None,
    target_vocab_size: int | None,
    forwards: int,
) -> DraftProposal:
    """The first ``n`` denoised positions as a chain; draft ids mapped to target ids, q scattered
    into the target vocabulary (zero outside the draft vocabulary)."""
    tokens, q = tokens[:, :n], None if q is None else q[:, :n]
    if vocab is not None:
        if target_vocab_size is None:
            raise ValueError("a draft vocabulary needs target_vocab_size")
        tokens = vocab[tokens]
        if q is not None:
            q = torch.zeros((*q.shape[:2], target_vocab_size), dtype=q.dtype, device=q.device).index_copy_(2, vocab, q)
    return DraftProposal(tokens, q, confidence[:, :n], forwards=forwards)


def _keyed_guesses(keys: NoiseKeys, sampling: SamplingParams, length: int, vocab: torch.Tensor | None):
    """logits (B, L, V') -> (ids, probs) (B, L, m): each block position's m best guesses at the
    target's keyed sample (block position j is the row's next position + j; noise keyed by target ids)."""
    seeds, positions = keys.at(torch.arange(length))  # (B*L,) each

    def guess(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, v = logits.shape
        warped = warp_logits(logits.reshape(b * n, v), sampling)  # (B*L, V')
        ids, probs = keyed_candidates(warped, seeds, positions, width, id_map=vocab)
        return ids.view(b, n, -1), probs.view(b, n, -1)

    return guess
