"""Verification: acceptance rules as pure tensor functions, and the verifier that runs the target."""

from verify.acceptance import (
    AcceptResult,
    block_verification_accept,
    greedy_accept,
    match_accept,
    speculative_sampling_accept,
)
from verify.sampling import SamplingParams, probs_from_logits, warp_logits
from verify.tree import build_tree, graft_chain, greedy_tree_accept, sampling_tree_accept

__all__ = [
    "AcceptResult", "greedy_accept", "match_accept", "speculative_sampling_accept", "block_verification_accept",
    "SamplingParams", "probs_from_logits", "warp_logits",
    "build_tree", "graft_chain", "greedy_tree_accept", "sampling_tree_accept",
]
