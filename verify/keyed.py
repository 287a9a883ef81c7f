"""Reproducible sampling: every sampled token is a function of (seed, position) and the target's
distribution alone, whatever drafts were verified, whichever batch the row shared.

Gumbel-max sampling: token = argmax_x (l_x + g_x), with l the warped log-probabilities and g_x
i.i.d. standard Gumbel noise, is an exact draw from softmax(l). Here the noise is not drawn from a
generator's stream (whose order would depend on the drafts and the batch) but computed by a
counter-based hash of (seed, position, token id): the same seed and position always give the same
noise. Plain sampled decoding and speculative decoding then commit the same tokens, and
verification is argmax matching on perturbed logits (lossless by construction: each committed token
is the Gumbel-max draw at its position). A drafter that perturbs its own logits with the same noise
proposes the token the target will sample whenever the two distributions agree (a Gumbel coupling;
it accepts somewhat less than Leviathan-style rejection sampling, which is the optimal coupling but
consumes randomness in a draft-dependent order).

Cost: the noise is hashed only for each position's ``HEAD`` most likely tokens; the rest of the
vocabulary (the tail) competes as one aggregate with its own Gumbel draw at log(tail mass) (the max
of the tail's perturbed values is exactly Gumbel(logsumexp(tail))), and in the rare case it wins
the token is drawn from the tail by a keyed inverse CDF. The head depends only on the distribution,
so the scheme stays exact and deterministic.

Glossary:
    seed: a row's sampling key (int64), recorded so a sample can be regenerated.
    position: the index of the token in its row's sequence (prompt included).
    head: the ``HEAD`` highest warped logits of a position; tail: the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: tokens per position that get their own Gumbel noise; the rest share one aggregate draw
HEAD = 64
_M32 = 0xFFFFFFFF
#: pseudo token ids of the two extra streams per position (outside any vocabulary once masked to 32 bits)
_TAIL_SCORE = -1
_TAIL_PICK = -2


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds) on int64 tensors holding values in
    [0, 2**32); the multipliers are below 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _position_key(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (seed, position); seeds and positions broadcast. Both halves of the 64-bit
    seed enter the key."""
    seeds = seeds.long()
    high = _mix32((seeds >> 32) & _M32)
    return _mix32(_mix32((seeds & _M32) ^ high) ^ (positions.long() & _M32))


def keyed_uniform(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per token id: a pure function of (seed, position, id).

    seeds, positions: (N,); ids: (N, M) long -> (N, M) float32. 23 bits of resolution, strictly
    inside (0, 1) in float32."""
    key = _position_key(seeds, positions)[:, None]  # (N, 1)
    h = _mix32((key + (ids.long() & _M32) * 0x9E3779B1) & _M32)  # ids < 2**32: the product fits in int64
    h = _mix32(h ^ (key >> 7))
    return ((h >> 9).float() + 0.5) * (2.0**-23)


def keyed_gumbel(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise per token id, (N,), (N,), (N, M) -> (N, M) float32."""
    return -torch.log(-torch.log(keyed_uniform(seeds, positions, ids)))


def _tail_pick(
    warped: torch.Tensor, head_ids: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """A draw from the tail (the distribution without the head) by a keyed inverse CDF in id order.
    warped: (N, V), head_ids (N, H) -> (N,) long."""
    tail = warped.scatter(-1, head_ids, float("-inf")).softmax(-1)  # (N, V)
    u = keyed_uniform(seeds, positions, torch.full_like(seeds.long(), _TAIL_PICK)[:, None])  # (N, 1)
    cdf = tail.cumsum(-1)
    index = torch.searchsorted(cdf, u * cdf[:, -1:])  # (N, 1)
    return index.clamp_max(warped.shape[-1] - 1).squeeze(-1)


def keyed_sample(warped: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, head: int = HEAD) -> torch.Tensor:
    """The sampled token of each position: an exact draw from softmax(warped), a pure function of
    (seed, position, warped).

    warped: (N, V) float32, the warped logits (filtered entries -inf); seeds, positions: (N,) -> (N,) long.
    """
    n, vocab = warped.shape
    top_v, top_i = warped.topk(min(head, vocab), dim=-1)  # (N, H)
    scores = top_v + keyed_gumbel(seeds, positions, top_i)  # -inf stays -inf
    best, arg = scores.max(-1)
    choice = top_i.gather(-1, arg[:, None]).squeeze(-1)
    if head >= vocab:
        return choice
    tail_lse = warped.scatter(-1, top_i, float("-inf")).logsumexp(-1)  # (N,) log of the tail's (unnormalised) mass
    tail_score = tail_lse + keyed_gumbel(seeds, positions, torch.full((n, 1), _TAIL_SCORE, device=warped.device))[:, 0]
    tail_wins = tail_score > best  # -inf > x is False: an empty tail never wins
    if bool(tail_wins.any()):
        rows = tail_wins.nonzero().squeeze(-1)
        choice = choice.clone()
        choice[rows] = _tail_pick(warped[rows], top_i[rows], seeds[rows], positions[rows])
    return choice


def keyed_candidates(
    warped: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    width: int,
    id_map: torch.Tensor | None = None,
    head: int = HEAD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A drafter's guesses at the keyed sample: its ``width`` best head tokens under the same noise.

    warped: (N, V') the drafter's warped logits (over a draft vocabulary when ``id_map`` (V',) maps
    its ids to target ids: the noise is keyed by target ids). Returns (ids (N, width) in the
    drafter's id space, best first; probs (N, width), the softmax of the perturbed head scores at
    those ids: a confidence that each is the target's sample)."""
    top_v, top_i = warped.topk(min(head, warped.shape[-1]), dim=-1)  # (N, H)
    target_ids = top_i if id_map is None else id_map[top_i]
    scores = top_v + keyed_gumbel(seeds, positions, target_ids)
    probs = scores.softmax(-1)
    best_p, order = probs.topk(min(width, probs.shape[-1]), dim=-1)  # (N, width)
    return top_i.gather(-1, order), best_p


@dataclass(frozen=True)
class NoiseKeys:
    """The keys of the active rows: ``seeds`` (B,) int64 and ``base`` (B,) long, the sequence
    position of each row's next token (its committed length)."""

    seeds: torch.Tensor
    base: torch.Tensor

    def at(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened (seeds, positions) for offsets (B, L) or (L,) after each row's base: (B*L,) each."""
        b = self.seeds.shape[0]
        offsets = offsets.to(self.base.device).expand(b, -1) if offsets.dim() == 1 else offsets.to(self.base.device)
        positions = self.base[:, None] + offsets  # (B, L)
        return self.seeds[:, None].expand_as(positions).reshape(-1), positions.reshape(-1)

    def row(self, r: int) -> "NoiseKeys":
        return NoiseKeys(self.seeds[r : r + 1], self.base[r : r + 1])
