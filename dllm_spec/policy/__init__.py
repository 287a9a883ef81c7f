"""Block-length policies: how many tokens to draft and how many of them to verify each cycle.

The loop consults one policy object per cycle for the whole batch: ``begin_cycle(rows)`` before
drafting, ``choose()`` on the proposal (one verified length per row), ``observe()`` after
verification. Policies never change the output (the verifier is lossless for any verified length);
they only trade verification work against accepted tokens.

* :class:`CostAwarePolicy` (default): expected committed tokens per second from the drafter's
  per-position confidences, an online-calibrated confidence -> acceptance map, and the target's
  measured latency curve.
* Baselines: :class:`FixedLength`, :class:`ConfidenceThreshold` (FailFast-style),
  :class:`MovingAverageLength` (DiffuSpec/SGLang-style), :class:`AssistedHeuristic`
  (transformers' +2/-1 schedule).
"""

from __future__ import annotations

from dllm_spec.policy.base import BlockLengthPolicy
from dllm_spec.policy.baselines import AssistedHeuristic, ConfidenceThreshold, FixedLength, MovingAverageLength
from dllm_spec.policy.calibration import AcceptanceCalibrator
from dllm_spec.policy.cost_aware import CostAwarePolicy, SourceStats

__all__ = [
    "BlockLengthPolicy",
    "FixedLength",
    "ConfidenceThreshold",
    "MovingAverageLength",
    "AssistedHeuristic",
    "AcceptanceCalibrator",
    "CostAwarePolicy",
    "SourceStats",
    "build_policy",
]


def build_policy(spec: str, default_k: int = 16) -> BlockLengthPolicy:
    """A policy from a short spec: ``adaptive[:MAX]``, ``fixed:K`` / ``fixed-K``, ``threshold[:THETA]``,
    ``moving-average``, ``heuristic``."""
    name, _, arg = spec.replace("fixed-", "fixed:").partition(":")
    if name == "adaptive":
        return CostAwarePolicy(max_k=_number(spec, arg, int, default_k, "adaptive:MAX with MAX a positive integer"))
    if name == "fixed":
        return FixedLength(_number(spec, arg, int, default_k, "fixed:K with K a non-negative integer"))
    if name == "threshold":
        return ConfidenceThreshold(
            _number(spec, arg, float, 0.4, "threshold:THETA with THETA a number in [0, 1]"), max_k=default_k
        )
    if name in ("moving-average", "ema"):
        return MovingAverageLength(max_k=default_k)
    if name == "heuristic":
        return AssistedHeuristic(max_k=default_k)
    raise ValueError(
        f"unknown policy {spec!r}: use adaptive[:MAX], fixed:K, threshold[:THETA], moving-average or heuristic"
    )


def _number(spec: str, arg: str, kind: type, default, expected: str):
    """The spec's argument as ``kind`` (``default`` when absent); a bad one names the spec."""
    if not arg:
        return default
    try:
        return kind(arg)
    except ValueError:
        raise ValueError(f"policy {spec!r}: expected {expected}, got {arg!r}") from None
