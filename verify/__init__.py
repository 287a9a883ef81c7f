"""Verification: acceptance rules as pure tensor functions, and the verifier that runs the target."""

from dllm_spec.verify.acceptance import (
    AcceptResult,
    block_verification_accept,
    choice_accept,
    greedy_accept,
    match_accept,
    speculative_sampling_accept,
)
from dllm_spec.verify.keyed import NoiseKeys, keyed_candidates, keyed_sample
from dllm_spec.verify.sampling import SamplingParams, probs_from_logits, warp_logits
from dllm_spec.verify.tree import build_tree, graft_chain, greedy_tree_accept, sampling_tree_accept

__all__ = [
    "AcceptResult",
    "choice_accept",
    "greedy_accept",
    "match_accept",
    "speculative_sampling_accept",
    "block_verification_accept",
    "SamplingParams",
    "probs_from_logits",
    "warp_logits",
    "NoiseKeys",
    "keyed_sample",
    "keyed_candidates",
    "build_tree",
    "graft_chain",
    "greedy_tree_accept",
    "sampling_tree_accept",
]
