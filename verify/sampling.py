"""Sampling parameters and the one function that turns logits into the distribution a token is
drawn from. The verifier (for p) and every drafter (for q) call the same function, so temperature,
top-k and top-p are applied identically on both sides, as lossless speculative sampling requires."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: how a sampled (temperature > 0) token is drawn and verified
SAMPLING_METHODS = ("reproducible", "speculative")
#: below this a temperature is refused (logits / T overflow float32): use 0 for greedy
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters.

    ``method`` (temperature > 0 only): ``"reproducible"``: Gumbel-max sampling with noise keyed by
    (seed, position) (:mod:`dllm_spec.verify.keyed`), so a seed gives the same text whatever the
    drafter, the batch or the speculation; ``"speculative"``: rejection sampling (Leviathan et al.,
    SpecInfer for trees), whose random draws depend on the drafts."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    method: str = "reproducible"

    def __post_init__(self) -> None:
        if not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.method not in SAMPLING_METHODS:
            raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {self.method!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def keyed(self) -> bool:
        """Whether tokens are drawn by keyed Gumbel-max (reproducible sampling at temperature > 0)."""
        return not self.greedy and self.method == "reproducible"


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order transformers uses); filtered entries -inf.

    logits: (..., V) -> (..., V) float32.
    """
    logits = logits.float()
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: one-hot argmax when greedy, else softmax of the
    warped logits. (..., V) -> (..., V) float32."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return warp_logits(logits, params).softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None | list) -> torch.Tensor:
    """One draw per row. probs (..., V) -> (...) long. ``generator`` may be a list of one generator
    per batch row (probs (B, ..., V)), so that a row's draws never depend on its neighbours."""
    if isinstance(generator, list):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        return torch.stack([sample(probs[r], g) for r, g in enumerate(generator)])
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
