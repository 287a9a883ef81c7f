"""The one generate loop: prefill, then draft -> verify -> commit -> resync until a stop.

Every drafter and every acceptance rule runs through :func:`speculative_decode`; plain
autoregressive decoding is the same loop with a drafter that proposes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dllm_spec.policy import BlockLengthPolicy
from dllm_spec.stats import GenerationStats
from drafters.base import Drafter, DraftProposal
from verify.sampling import SamplingParams
from verify.verifier import Verifier


@dataclass(frozen=True)
class StopConditions:
    """max_new_tokens: exact cap; stop_token_ids: ids that end generation (emitted, then stop);
    context_limit: the model's maximum sequence length."""

    max_new_tokens: int
    stop_token_ids: frozenset[int]
    context_limit: int

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")


def _timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _first_stop(tokens: torch.Tensor, stop_ids: frozenset[int]) -> int | None:
    """Index of the first stop id in a 1-D tensor, or None."""
    for i, t in enumerate(tokens.tolist()):
        if t in stop_ids:
            return i
    return None


def speculative_decode(
    verifier: Verifier,
    drafter: Drafter,
    policy: BlockLengthPolicy,
    input_ids: torch.Tensor,
    stop: StopConditions,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    stats: GenerationStats,
) -> Iterator[torch.Tensor]:
    """Yield the newly committed tokens of each cycle, (B, n) with n >= 1, until a stop.

    Never yields a token past the first stop id or past ``max_new_tokens``, even when a verified
    block accepted more. ``stats`` is filled in as the loop runs.
    """
    device = input_ids.device
    batch = input_ids.shape[0]
    if batch != 1:
        raise ValueError(f"batch size {batch} is not supported yet: pass input_ids of shape (1, T)")
    start = _timer(device)
    features = verifier.prefill(input_ids)
    drafter.begin(input_ids, features)
    stats.prompt_tokens = input_ids.shape[1]
    stats.prefill_time_s = _timer(device) - start
    stats.drafter = drafter.name
    committed = input_ids
    generated = 0
    try:
        while True:
            budget = stop.max_new_tokens - generated
            room = stop.context_limit - committed.shape[1]
            if room <= 0:
                stats.stop_reason = "context"
                return
            k = max(0, min(policy.draft_length(), room - 1))  # tokens (tree nodes) fed to the target besides the last
            if drafter.tree_width == 1 or budget <= 1:
                k = min(k, budget - 1)  # a chain's length is its depth
            t0 = _timer(device)
            drafted = drafter.propose(committed, k, sampling, generator) if k > 0 else DraftProposal.empty(batch, device)
            drafted = drafted.limit_depth(budget - 1)  # never accept past max_new_tokens
            proposal = drafted.truncate(min(k, policy.choose(drafted)))  # what is verified
            t1 = _timer(device)
            outcome = verifier.verify(committed[:, -1:], proposal, sampling, generator)
            t2 = _timer(device)
            n = int(outcome.num_accepted[0])
            stats.draft_time_s += t1 - t0
            stats.verify_time_s += t2 - t1
            stats.draft_forwards += proposal.forwards
            stats.record_cycle(proposal.length, n, policy.last_prediction, proposal.depth)
            policy.observe(drafted, proposal.length, n, t1 - t0, t2 - t1, path=outcome.path if proposal.is_tree else None)

            new = torch.cat([outcome.tokens, outcome.next_token[:, None]], dim=1)  # (B, n+1)
            cut = _first_stop(new[0], stop.stop_token_ids)
            hit_stop = cut is not None and cut < budget
            new = new[:, : min(budget, cut + 1 if hit_stop else budget)]
            reason = "eos" if hit_stop else ("length" if new.shape[1] == budget else None)
            committed = torch.cat([committed, new], dim=1)
            generated += new.shape[1]
            stats.new_tokens = generated
            yield new
            if reason is not None:
                stats.stop_reason = reason
                return
            drafter.commit(committed, outcome.features)
    finally:
        stats.wall_time_s = _timer(device) - start
