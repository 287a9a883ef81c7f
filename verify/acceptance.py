"""Acceptance rules as pure tensor functions.

Notation follows Leviathan et al. (2023) and Chen et al. (2023): ``p`` is the target's
distribution, ``q`` the drafter's. For a draft of k tokens d_1..d_k:

* ``draft_tokens``: (B, k) the drafted ids;
* ``q``: (B, k, V), ``q[:, i]`` the distribution d_{i+1} was actually drawn from;
* ``p``: (B, k + 1, V), ``p[:, i]`` the target's distribution for the token after
  ``context + d_1..d_i`` (so ``p[:, k]`` gives the bonus token).

Every rule returns how many drafts each row accepts and the one token the target adds (the
correction at the first rejection, or the bonus after a fully accepted draft). All randomness
comes from the explicit ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm_spec.verify.sampling import sample


@dataclass(frozen=True)
class AcceptResult:
    """num_accepted: (B,) in [0, k]; next_token: (B,) the target's own token after them."""

    num_accepted: torch.Tensor
    next_token: torch.Tensor


def _prefix_length(accepted: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row. (B, k) bool -> (B,) long."""
    return accepted.long().cumprod(dim=-1).sum(dim=-1)


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for x (B, L, ...) and index (B,)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def greedy_accept(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor, lengths: torch.Tensor | None = None
) -> AcceptResult:
    """Accept the longest prefix equal to the target's argmax; the next token is the argmax after it.
    ``lengths`` (B,): row r's drafts are its first ``lengths[r]`` (the rest is padding, never accepted)."""
    return choice_accept(draft_tokens, target_logits.argmax(dim=-1), lengths)


def choice_accept(
    draft_tokens: torch.Tensor, choice: torch.Tensor, lengths: torch.Tensor | None = None
) -> AcceptResult:
    """Accept the longest prefix equal to the target's own choices ``choice`` (B, k+1) (its argmax, or
    its keyed samples in reproducible sampling); the next token is the choice after it."""
    k = draft_tokens.shape[1]
    hits = draft_tokens == choice[:, :k]
    if lengths is not None:
        hits &= torch.arange(k, device=hits.device)[None, :] < lengths.to(hits.device)[:, None]
    n = _prefix_length(hits)
    return AcceptResult(n, _at(choice, n))


def match_accept(draft_tokens: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> AcceptResult:
    """For drafters that provide no q: draw x_i ~ p_i at every position, accept while x_i == d_i.

    Each committed token is a draw from the target's p at its position, so the output
    distribution is exactly the target's. Equivalent to speculative sampling with a one-hot q,
    which accepts d_i with probability p_i(d_i).
    """
    x = sample(p, generator)  # (B, k+1)
    k = draft_tokens.shape[1]
    n = _prefix_length(draft_tokens == x[:, :k])
    return AcceptResult(n, _at(x, n))


def _residual_sample(
    weighted_p: torch.Tensor, q: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample from norm(max(0, weighted_p - q)); rows whose residual has no mass use ``fallback``. (B, V) -> (B,)."""
    residual = (weighted_p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), fallback)
    return sample(residual, generator)


def speculative_sampling_accept(
    draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
) -> AcceptResult:
    """Token-level lossless speculative sampling.

    Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
    norm(max(0, p_i - q_i)); if all k pass, sample the bonus from p_k.
    """
    batch, k = draft_tokens.shape
    p_d = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # (B, k)
    q_d = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # (B, k)
    u = torch.rand((batch, k), generator=generator, device=p.device)
    n = _prefix_length(u * q_d < p_d)  # u < p/q without dividing by zero
    q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # (B, k+1, V): no q after the last draft
    p_n = _at(p, n)
    return AcceptResult(n, _residual_sample(p_n, _at(q_ext, n), p_n, generator))


def block_verification_accept(
    draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
) -> AcceptResult:
    """Block verification (Sun et al., "Block Verification Accelerates Speculative Decoding", 2024).

    Verifies the draft jointly rather than token by token: never accepts fewer tokens in
    expectation than :func:`speculative_sampling_accept`, and keeps the target distribution.
    With weights w_0 = 1, w_i = min(1, w_{i-1} p_i(d_i) / q_i(d_i)), position i < k passes with
    probability h_i = r_i / (r_i + 1 - w_i), r_i = sum_x max(0, w_i p_{i}(x) - q_{i}(x)) (the
    distributions after d_1..d_i), and h_k = w_k. tau is the LAST passing position; the next
    token comes from norm(max(0, w_tau p_tau - q_tau)) (just p_k when tau = k).
    """
    batch, k = draft_tokens.shape
    p_d = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # (B, k)
    q_d = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    weights = [torch.ones(batch, device=p.device)]
    passes = []
    eta = torch.rand((batch, k), generator=generator, device=p.device)
    for i in range(k):
        ratio = torch.where(q_d[:, i] > 0, p_d[:, i] / q_d[:, i].clamp_min(1e-30), torch.zeros_like(p_d[:, i]))
        w = (weights[-1] * ratio).clamp(max=1.0)
        weights.append(w)
        if i < k - 1:
            r = (w.unsqueeze(-1) * p[:, i + 1] - q[:, i + 1]).clamp_min(0).sum(-1)
            denom = r + 1 - w
            h = torch.where(denom > 0, r / denom.clamp_min(1e-30), torch.ones_like(r))
        else:
            h = w
        passes.append(eta[:, i] <= h)
    passed = torch.stack(passes, dim=1) if passes else torch.zeros((batch, 0), dtype=torch.bool, device=p.device)
    positions = torch.arange(1, k + 1, device=p.device).expand(batch, k)
    tau = (
        torch.where(passed, positions, torch.zeros_like(positions)).amax(dim=1)
        if k
        else torch.zeros(batch, dtype=torch.long, device=p.device)
    )
    w_tau = _at(torch.stack(weights, dim=1), tau)  # (B,)
    q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # (B, k+1, V)
    p_tau = _at(p, tau)
    return AcceptResult(tau, _residual_sample(w_tau.unsqueeze(-1) * p_tau, _at(q_ext, tau), p_tau, generator))
