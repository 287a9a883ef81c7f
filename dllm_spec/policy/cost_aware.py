"""The default block-length policy: verify the number of drafts (one cap for a batch) that maximises
expected committed tokens per second, from calibrated confidences and the measured latency surface."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from dllm_spec.latency import LatencyCurve, LatencySurface, load_or_measure
from dllm_spec.policy.base import BlockLengthPolicy
from dllm_spec.policy.calibration import AcceptanceCalibrator
from dllm_spec.verify.proposal import DraftProposal
from dllm_spec.verify.tree import path_products


class CostAwarePolicy(BlockLengthPolicy):
    """Verify the k that maximises expected committed tokens per second.

    E(k) = 1 + sum_{i<=k} prod_{j<=i} a(c_j), with a the online-calibrated confidence -> acceptance
    map (for a draft tree the product runs over each node's path, :func:`dllm_spec.verify.tree.path_products`,
    and k counts nodes); cost(k) = drafting time + latency of a (k+1)-token target forward, from the
    measured curve (refreshed online). The draft length itself comes from the drafter's measured
    cost: a drafter that runs once per token (``DraftProposal.forwards`` equal to its length: an AR
    drafter) drafts the k that maximises the same rate under its running acceptance rate, one that
    drafts a whole block per call (a diffusion drafter, prompt lookup) drafts ``max_k``, since more
    costs it nothing; the verified length is then cut per cycle from the actual confidences.

    When drafting costs something (more than ``free_draft_fraction`` of a one-token step) and the
    drafted cycles have been committing fewer tokens per second than a plain one-token step would
    (an EMA of (accepted + 1) / (verify latency + draft time), relative to the one-token latency:
    a weak or costly drafter, or a target whose multi-token forward costs much more than a
    one-token one, as on CPUs), the policy skips drafting (``begin_cycle() == 0``: the cycle is a
    plain autoregressive step). A near-free drafter (prompt lookup) is never skipped: ``choose()``
    can already decline to verify its proposal at no cost, and skipping would only miss its
    matches. While skipping it still drafts every ``probe_every``-th cycle to keep its estimates
    fresh, doubling that interval (up to ``max_probe_every``) while probes keep losing and resetting
    it when one wins, so a drafter that starts to pay off is picked up again.

    Everything it learns (calibration, costs, gain, acceptance rate, probing) is kept per draft
    source (``DraftProposal.source``): a composite drafter such as prompt lookup with a
    block-diffusion fallback gets one calibration per confidence scale, is skipped as a whole only
    when every source loses, and asks :meth:`request_draft` before running its costly part, so a
    losing fallback is skipped while the free lookups go on.

    With a batch of b rows every row is verified in the same forward, whose cost is that of k + 1
    tokens per row for the longest row: the policy picks ONE cap K for the cycle maximising
    sum_r E_r(min(K, n_r)) / (draft time + latency(K + 1, b)) over the measured (tokens, rows)
    latency surface, and each row verifies min(K, n_r) of its drafts. As the batch grows the target
    becomes compute-bound, latency(K + 1, b) climbs faster than the expected gain, K shrinks, and at
    K = 0 the cycle is plain batched decoding. The estimate can still be wrong (a calibration learnt
    on other rows, a surface measured at a shorter context), so a batch also checks the outcome:
    while the cycles it verified drafts in have been committing fewer tokens per second than a plain
    batched step (an EMA per batch size, as for skipping a drafter), it verifies nothing but every
    ``probe_every``-th cycle, backing off the same way.

    Args:
        max_k: longest draft.
        latency: target latency (a :class:`LatencyCurve` for one row, or a :class:`LatencySurface`);
            ``None`` measures (or loads the cached) curves on ``bind`` / ``prepare``.
        min_draft: when drafting, never draft fewer than this (block drafters trained at a size
            should keep it: set ``min_draft = max_k`` to always draft the trained block and only
            truncate what is verified).
        allow_skip: skip drafting when it does not pay (see above); ``False`` always drafts.
        free_draft_fraction: drafting cheaper than this fraction of a one-token step is never skipped.
        probe_every, max_probe_every: the probing interval while skipping (cycles).
        batch_margin: with several rows, verify drafts only when the expected rate beats plain
            batched decoding by this fraction (the latency of a wide batch is the least certain
            input: near break-even the plain step is kept).
        gain_momentum: the memory of the gain estimates behind skipping a drafter and a batch's
            verifying (EMAs of tokens and of time per cycle; 0.9 remembers about ten cycles).
    """

    def __init__(
        self,
        max_k: int = 16,
        latency: LatencyCurve | LatencySurface | None = None,
        min_draft: int = 1,
        momentum: float = 0.9,
        allow_skip: bool = True,
        probe_every: int = 4,
        max_probe_every: int = 64,
        free_draft_fraction: float = 0.05,
        batch_margin: float = 0.1,
        gain_momentum: float = 0.9,
    ) -> None:
        if max_k < 1 or not 1 <= min_draft <= max_k:
            raise ValueError(f"need max_k >= 1 and 1 <= min_draft <= max_k, got max_k={max_k}, min_draft={min_draft}")
        if not 1 <= probe_every <= max_probe_every:
            raise ValueError(f"need 1 <= probe_every <= max_probe_every, got {probe_every}, {max_probe_every}")
        self.max_k = max_k
        self.min_draft = min_draft
        self.latency = latency
        self.momentum = momentum
        self.allow_skip = allow_skip
        self.free_draft_fraction = free_draft_fraction
        if not 0 <= gain_momentum < 1:
            raise ValueError(f"gain_momentum must be in [0, 1), got {gain_momentum}")
        if batch_margin < 0:
            raise ValueError(f"batch_margin must be >= 0, got {batch_margin}")
        self.batch_margin = batch_margin
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.sources: dict[str | None, SourceStats] = {}
        self.skipped = 0  # cycles run without drafting (for stats and tests)
        self.gain_momentum = gain_momentum
        self.name = "adaptive"
        self.last_predictions = None
        self.rows = 1  # rows of the current cycle
        self.recent_cap = 4.0  # EMA of the verified cap K chosen for batches (sizes their drafts)
        self.batch_gates: dict[int, ProbeGate] = {}  # per batch size (rounded up to a power of two)

    @property
    def latency(self) -> LatencySurface | None:
        return self._latency

    @latency.setter
    def latency(self, value: LatencyCurve | LatencySurface | None) -> None:
        self._latency = LatencySurface({1: value}) if isinstance(value, LatencyCurve) else value

    def bind(self, target: PreTrainedModel) -> None:
        if self._latency is None:
            self._latency = LatencySurface({1: load_or_measure(target)}, model=target)

    def prepare(self, max_rows: int) -> None:
        if self._latency is not None:  # measures missing and stale curves, outside any timed cycle
            for rows in sorted({1 << i for i in range(max_rows.bit_length())} | {max_rows}):
                self._latency.ensure(rows)

    def stats(self, source: str | None = None) -> "SourceStats":
        """What the policy has learnt about one draft source (``None``: a single drafter)."""
        if source not in self.sources:
            self.sources[source] = SourceStats(gate=ProbeGate(interval=self.probe_every))
        return self.sources[source]

    def _step(self, k: int, rows: int | None = None) -> float:
        """Seconds of a forward over k tokens per row."""
        assert self._latency is not None, "bind() the policy to a target first"
        return self._latency(k, self.rows if rows is None else rows)

    def _rate(self, expected: torch.Tensor, k_max: int, draft_cost: torch.Tensor) -> torch.Tensor:
        """Tokens per second for verifying k = 0..k_max drafts per row: E (k_max+1,), cost (k_max+1,)."""
        verify = torch.tensor([self._step(k + 1) for k in range(k_max + 1)])
        return expected / (verify + draft_cost)

    def _losing(self, st: "SourceStats") -> bool:
        costly = st.draft_cost_per_call is not None and st.draft_cost_per_call > self.free_draft_fraction * self._step(
            1
        )
        return self.allow_skip and costly and st.gate.losing

    def _sit_out(self, st: "SourceStats") -> bool:
        """Skip this source this cycle? (a losing source drafts only every ``interval``-th cycle)"""
        return st.gate.sits_out(self._losing(st))

    def batch_gate(self, rows: int) -> "ProbeGate":
        """What the policy has learnt about verifying drafts in a batch of about ``rows`` rows."""
        bucket = 1 << (rows - 1).bit_length()
        if bucket not in self.batch_gates:
            self.batch_gates[bucket] = ProbeGate(interval=self.probe_every)
        return self.batch_gates[bucket]

    def _batch_sits_out(self, rows: int) -> bool:
        """Verify nothing in this batch cycle? (while verified batch cycles lose, only every
        ``interval``-th cycle verifies)"""
        gate = self.batch_gate(rows)
        return gate.sits_out(self.allow_skip and gate.losing)

    def _update_gate(self, gate: "ProbeGate", tokens: float, steps: float) -> None:
        gate.update(tokens, steps, self.gain_momentum, self.probe_every, self.max_probe_every)

    def begin_cycle(self, rows: int = 1) -> int:
        self.rows = rows
        known = list(self.sources.values()) or [self.stats()]
        if len(known) == 1:
            skip = self._sit_out(known[0])
        else:  # skipped as a whole only when every source loses (a free one never does)
            skip = all(self._losing(st) for st in known) and all([self._sit_out(st) for st in known])
        if skip:
            self.skipped += 1
            return 0
        ks = torch.arange(self.max_k + 1, dtype=torch.float32)
        best = self.min_draft
        for st in known:  # the longest draft any source would make (choose() cuts each proposal)
            if not st.cost_scales_with_length:
                if rows == 1:
                    return self.max_k  # drafting more costs nothing: let choose() cut with the actual confidences
                # a batch verifies a few drafts per row: ask for a little more than the recent caps
                return max(self.min_draft, min(self.max_k, math.ceil(self.recent_cap) + 2))
            expected = 1 + torch.cat(
                [torch.zeros(1), torch.cumsum(st.accept_rate ** torch.arange(1, self.max_k + 1), 0)]
            )
            rate = self._rate(expected, self.max_k, st.draft_cost_per_token * ks)
            best = max(best, int(rate[1:].argmax()) + 1)
        return best

    def request_draft(self, source: str) -> bool:
        return not self._sit_out(self.stats(source))

    def _expected(self, proposal: DraftProposal, r: int, k_max: int) -> torch.Tensor:
        """E_r(k) for k = 0..k_max: 1 + expected accepted drafts of row r when verifying its first k."""
        n = proposal.lengths[r]
        st = self.stats(proposal.sources[r])
        a = st.calibrator(proposal.confidence[r, :n])
        survival = torch.cumprod(a, 0) if proposal.parents is None else path_products(a, proposal.parents[r, :n])
        expected = 1 + torch.cat([torch.zeros(1), torch.cumsum(survival, 0)])  # (n+1,)
        return torch.cat([expected, expected[-1:].expand(k_max - n)]) if k_max > n else expected

    def choose(self, proposal: DraftProposal) -> list[int]:
        k_max = proposal.length
        self.rows = proposal.batch
        if k_max == 0:
            self.last_predictions = [0.0] * proposal.batch
            return [0] * proposal.batch
        per_row = torch.stack([self._expected(proposal, r, k_max) for r in range(proposal.batch)])  # (B, k_max+1)
        cost = max(self.stats(s).draft_cost_per_token for s in set(proposal.sources)) * k_max
        rate = self._rate(per_row.sum(0), k_max, torch.full((k_max + 1,), cost))
        k = int(rate.argmax())
        if proposal.batch > 1 and (
            rate[k] < (1 + self.batch_margin) * rate[0] or (k and self._batch_sits_out(proposal.batch))
        ):
            k = 0  # a batch speculates only for a clear gain: near break-even, plain batched decoding is the safe bet
        if proposal.batch > 1:
            self.recent_cap = 0.8 * self.recent_cap + 0.2 * k
        verified = [min(k, n) for n in proposal.lengths]
        self.last_predictions = [float(per_row[r, v] - 1) for r, v in enumerate(verified)]
        return verified

    def observe(self, proposal, verified, accepted, draft_time_s, verify_time_s, paths=None) -> None:
        rows = proposal.batch
        k_verify = max(verified, default=0)
        outcome = None
        if self._latency is not None:
            # this cycle's tokens per row, and its time in plain steps of the same rows: the live
            # verify time (a wide verify at long contexts costs more than the curve measured at a
            # short one) against the surface's plain step
            outcome = (sum(accepted) + rows) / rows, (max(verify_time_s, 1e-9) + draft_time_s) / self._step(1, rows)
        if rows > 1 and k_verify and outcome is not None:
            self._update_gate(self.batch_gate(rows), *outcome)
        if proposal.length:
            m = self.momentum
            for source in set(proposal.sources):
                st = self.stats(source)
                st.draft_cost_per_token = m * st.draft_cost_per_token + (1 - m) * draft_time_s / proposal.length
                prev = st.draft_cost_per_call
                st.draft_cost_per_call = draft_time_s if prev is None else m * prev + (1 - m) * draft_time_s
                if proposal.length > 1:  # a drafter that runs once per token (AR) vs once per block (diffusion, lookup)
                    st.cost_scales_with_length = proposal.forwards >= proposal.length
                if outcome is not None:
                    self._update_gate(st.gate, *outcome)
        for r in range(rows):
            if not verified[r]:
                continue
            st = self.stats(proposal.sources[r])
            n = proposal.lengths[r]
            parents = None if proposal.parents is None else proposal.parents[r, :n]
            st.calibrator.update(
                proposal.confidence[r, :n], verified[r], accepted[r], parents, None if paths is None else paths[r]
            )
            tested = min(verified[r], accepted[r] + 1)
            st.accept_rate = min(
                0.98, max(0.02, self.momentum * st.accept_rate + (1 - self.momentum) * accepted[r] / tested)
            )
        if self._latency is not None:
            self._latency.observe(k_verify + 1, verify_time_s, rows)


@dataclass
class ProbeGate:
    """Whether something that costs time has been paying (a draft source's drafting, a batch size's
    verifying): the gain of the cycles that did it over a plain step, and the probing interval
    while that gain is below 1 (doubled while probes lose, reset when one wins).

    The gain is a ratio of two EMAs, tokens per row per cycle over the cycle's time in plain steps,
    not an EMA of per-cycle ratios: one cycle's outcome is noisy (a draft is taken or missed), and
    an EMA over a few cycles dips below 1 after a run of misses even where drafting pays on
    average, which then sits a paying drafter out."""

    tokens: float | None = None  # EMA of the tokens a row commits per cycle
    steps: float | None = None  # EMA of a cycle's time, in plain steps of the same rows
    interval: int = 4
    since: int = 0  # cycles sat out since the last probe

    @property
    def gain(self) -> float | None:
        """Tokens per second of the cycles that did it, over a plain step's (None before any)."""
        return None if self.tokens is None else self.tokens / max(self.steps, 1e-9)

    @property
    def losing(self) -> bool:
        return self.gain is not None and self.gain < 1.0

    def sits_out(self, losing: bool) -> bool:
        """Sit this cycle out? While ``losing``, only every ``interval``-th cycle goes ahead."""
        if losing and self.since + 1 < self.interval:
            self.since += 1
            return True
        self.since = 0
        return False

    def update(self, tokens: float, steps: float, momentum: float, probe_every: int, max_probe_every: int) -> None:
        """One cycle that did it: ``tokens`` committed per row in ``steps`` plain steps' time."""
        if self.tokens is None:
            self.tokens, self.steps = tokens, steps
        else:
            self.tokens = momentum * self.tokens + (1 - momentum) * tokens
            self.steps = momentum * self.steps + (1 - momentum) * steps
        self.interval = probe_every if tokens >= steps else min(max_probe_every, 2 * self.interval)


@dataclass
class SourceStats:
    """What :class:`CostAwarePolicy` learns about one source of drafts."""

    calibrator: AcceptanceCalibrator = field(default_factory=AcceptanceCalibrator)
    draft_cost_per_token: float = 0.0  # seconds, EMA
    draft_cost_per_call: float | None = None  # seconds, EMA (a block drafter's cost barely depends on k)
    cost_scales_with_length: bool = True  # one drafter forward per drafted token (from DraftProposal.forwards)
    accept_rate: float = 0.6  # conditional acceptance, EMA (for choosing the draft length)
    gate: ProbeGate = field(default_factory=ProbeGate)  # whether drafting pays; probing while it does not

    @property
    def draft_gain(self) -> float | None:
        """EMA of drafted cycles' tokens/s over a plain step's."""
        return self.gate.gain
