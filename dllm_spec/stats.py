"""Generation statistics (vLLM/SGLang conventions): tau = committed new tokens per target forward
in the decoding phase, bonus token included; acceptance per draft position."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call.

    accepted_per_position[i]: how many cycles accepted the draft token at position i (0-based);
    verified_per_position[i]: how many cycles verified a draft token at position i; their ratio is
    the per-position acceptance rate. For a draft tree, position = depth: a cycle verified depth i
    when its tree had a node there. verified_lengths: draft tokens (tree nodes) verified in each
    cycle; acceptance_rate: accepted over verified draft tokens.
    """

    new_tokens: int = 0
    target_forwards: int = 0
    row_forwards: int = 0  # a batch's rows summed over its target forwards (0 for one sequence: = target_forwards)
    draft_forwards: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    verified_per_position: list[int] = field(default_factory=list)
    verified_lengths: list[int] = field(default_factory=list)
    predicted_accepted: list[float] = field(default_factory=list)
    observed_accepted: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    stop_reason: str = ""
    drafter: str = ""
    seed: int | None = None  # the row's sampling seed: generate with seed=this to reproduce it

    @property
    def tau(self) -> float:
        """Mean committed tokens per target forward and row (decoding phase)."""
        forwards = self.row_forwards or self.target_forwards
        return self.new_tokens / forwards if forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified draft tokens."""
        return self.accepted_tokens / self.verified_tokens if self.verified_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def calibration_error(self) -> float | None:
        """Mean |predicted - observed| accepted drafts per cycle, over cycles where the policy predicted."""
        if not self.predicted_accepted:
            return None
        return sum(abs(p - o) for p, o in zip(self.predicted_accepted, self.observed_accepted)) / len(
            self.predicted_accepted
        )

    @property
    def prediction_bias(self) -> float | None:
        """Mean (predicted - observed) accepted drafts per cycle: > 0 means the policy is optimistic."""
        if not self.predicted_accepted:
            return None
        return (sum(self.predicted_accepted) - sum(self.observed_accepted)) / len(self.predicted_accepted)

    def record_cycle(
        self, verified: int, accepted: int, predicted: float | None = None, depth: int | None = None
    ) -> None:
        """``verified`` draft tokens, ``accepted`` of them; ``depth``: a tree's depth (default: a chain's, = verified)."""
        for store, count in (
            (self.verified_per_position, verified if depth is None else depth),
            (self.accepted_per_position, accepted),
        ):
            if len(store) < count:
                store.extend([0] * (count - len(store)))
            for i in range(count):
                store[i] += 1
        self.verified_lengths.append(verified)
        self.verified_tokens += verified
        self.accepted_tokens += accepted
        self.target_forwards += 1
        if predicted is not None:
            self.predicted_accepted.append(predicted)
            self.observed_accepted.append(accepted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tau=self.tau,
            acceptance_rate=self.acceptance_rate,
            tokens_per_s=self.tokens_per_s,
            calibration_error=self.calibration_error,
            prediction_bias=self.prediction_bias,
        )
        return d

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.wall_time_s:.2f}s ({self.tokens_per_s:.1f} tok/s), "
            f"tau {self.tau:.2f}, {self.target_forwards} target forwards, acceptance {self.acceptance_rate:.0%}, "
            f"drafter {self.drafter}, stop: {self.stop_reason}"
        )
