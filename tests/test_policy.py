"""Block-length policies (dllm_spec/policy/): calibration, the cost-aware choice for one row and for a
batch over a (tokens, rows) latency surface, skipping and probing a losing drafter per source, and
the baselines' settings."""

from __future__ import annotations

import pytest
import torch

from dllm_spec.policy import AssistedHeuristic, ConfidenceThreshold, CostAwarePolicy, FixedLength, MovingAverageLength
from dllm_spec.policy.cost_aware import ProbeGate
from dllm_spec.verify.proposal import DraftProposal


def test_calibrator_learns_acceptance_rates_per_confidence_bucket():
    from dllm_spec.policy import AcceptanceCalibrator

    cal = AcceptanceCalibrator(bins=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):  # confidence 0.9 is accepted 30% of the time: the drafter is over-confident
        accepted = int(torch.rand((), generator=g) < 0.3)
        cal.update(torch.tensor([0.9, 0.9]), verified=2, accepted=accepted)
    assert abs(float(cal(torch.tensor([0.9]))[0]) - 0.3) < 0.08
    assert float(cal(torch.tensor([0.1]))[0]) == pytest.approx(0.125)  # untouched bucket keeps its prior


def test_cost_aware_policy_verifies_more_when_confident_and_less_when_not():
    from dllm_spec.latency import LatencyCurve

    curve = LatencyCurve({1: 0.05, 8: 0.08, 16: 0.15})
    policy = CostAwarePolicy(max_k=16, latency=curve)
    confident = DraftProposal(torch.zeros((1, 16), dtype=torch.long), None, torch.full((1, 16), 0.97))
    doubtful = DraftProposal(torch.zeros((1, 16), dtype=torch.long), None, torch.full((1, 16), 0.05))
    assert policy.choose(confident) == [7]  # 8 tokens fed: past that the curve gets steep
    assert policy.last_prediction > 5
    assert policy.choose(doubtful) == [0]
    assert policy.last_prediction == 0.0
    flat = CostAwarePolicy(max_k=16, latency=LatencyCurve({1: 0.05, 32: 0.0501}))
    assert flat.choose(confident) == [16]  # verification is free: verify everything


def test_cost_aware_policy_stops_drafting_when_drafts_lose_and_keeps_drafting_when_they_win():
    """On a CPU-like latency curve (a 2-token forward costs 1.7 one-token ones) a drafter whose
    drafts are all rejected is mostly skipped (plain steps), still probed now and then; one whose
    drafts are all accepted is never skipped; nor is a free one (it costs nothing to look);
    ``allow_skip=False`` always drafts."""
    from dllm_spec.latency import LatencyCurve

    def run(policy, accept_all: bool, cycles: int = 200, draft_s: float = 0.01) -> list[int]:
        lengths = []
        for _ in range(cycles):
            k = policy.begin_cycle()
            lengths.append(k)
            if k:
                proposal = DraftProposal(torch.zeros((1, k), dtype=torch.long), None, torch.full((1, k), 0.5))
                verified = policy.choose(proposal)[0] or k  # the oracle case verifies what it drafted
                policy.observe(proposal, [verified], [verified if accept_all else 0], draft_s, 0.1)
        return lengths

    curve = {1: 0.06, 2: 0.105, 8: 0.13, 16: 0.14}
    losing = CostAwarePolicy(max_k=8, latency=LatencyCurve(dict(curve), momentum=1.0))
    lengths = run(losing, accept_all=False)
    probes = sum(k > 0 for k in lengths[50:])
    assert 0 < probes < 10 and losing.skipped == lengths.count(0)  # backed off to rare probes
    winning = CostAwarePolicy(max_k=8, latency=LatencyCurve(dict(curve), momentum=1.0))
    assert all(k > 0 for k in run(winning, accept_all=True)) and winning.skipped == 0
    always = CostAwarePolicy(max_k=8, latency=LatencyCurve(dict(curve), momentum=1.0), allow_skip=False)
    assert all(k > 0 for k in run(always, accept_all=False))
    free = CostAwarePolicy(
        max_k=8, latency=LatencyCurve(dict(curve), momentum=1.0)
    )  # prompt-lookup-like: drafting is free
    assert all(k > 0 for k in run(free, accept_all=False, draft_s=1e-5))


@pytest.mark.parametrize(
    "bad",
    [
        lambda: FixedLength(-1),
        lambda: ConfidenceThreshold(1.5),
        lambda: CostAwarePolicy(max_k=0),
        lambda: CostAwarePolicy(gain_momentum=1.0),
        lambda: MovingAverageLength(momentum=1.0),
        lambda: AssistedHeuristic(k=0),
    ],
)
def test_invalid_policy_settings_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_cost_aware_policy_skips_a_losing_fallback_but_not_the_free_lookups():
    """Per-source statistics: with a free source 'lookup' and a costly source 'diffusion' whose
    drafts are all rejected, the policy never skips drafting as a whole (the lookups go on) and
    gates the costly source down to rare probes; each source keeps its own calibration."""
    from dllm_spec.latency import LatencyCurve

    policy = CostAwarePolicy(max_k=8, latency=LatencyCurve({1: 0.06, 2: 0.105, 8: 0.13, 16: 0.14}, momentum=1.0))
    gated = []
    for cycle in range(200):
        k = policy.begin_cycle()
        assert k > 0
        source = "lookup" if cycle % 3 == 0 else "diffusion"
        if source == "diffusion":
            allowed = policy.request_draft("diffusion")
            gated.append(allowed)
            if not allowed:
                source = "lookup"
        cost, accepted = (1e-5, 2) if source == "lookup" else (0.02, 0)
        proposal = DraftProposal(torch.zeros((1, k), dtype=torch.long), None, torch.full((1, k), 0.9), source=source)
        verified = max(1, policy.choose(proposal)[0])
        policy.observe(proposal, [verified], [min(accepted, verified)], cost, 0.1)
    assert 0 < sum(gated[60:]) < 10  # the losing fallback is probed rarely
    assert policy.skipped == 0
    assert policy.stats("lookup").draft_gain > 1.0 > policy.stats("diffusion").draft_gain
    assert float(policy.stats("diffusion").calibrator(torch.tensor([0.9]))[0]) < float(
        policy.stats("lookup").calibrator(torch.tensor([0.9]))[0]
    )  # same confidence, learnt apart


def test_cost_aware_policy_drafts_longer_blocks_when_a_draft_costs_the_same_at_any_length():
    """Same total draft time and acceptance: a block drafter (one forward per block) is asked for a
    longer draft than a token-by-token drafter (one forward per token), whose cost grows with k."""
    from dllm_spec.latency import LatencyCurve

    def trained(forwards_per_token: bool) -> CostAwarePolicy:
        policy = CostAwarePolicy(max_k=16, latency=LatencyCurve({1: 0.05, 16: 0.06}, momentum=1.0))
        for _ in range(20):
            k = 8
            proposal = DraftProposal(
                torch.zeros((1, k), dtype=torch.long),
                None,
                torch.full((1, k), 0.8),
                forwards=k if forwards_per_token else 1,
            )
            policy.observe(proposal, verified=[k], accepted=[5], draft_time_s=0.04, verify_time_s=0.055)
        return policy

    block, per_token = trained(False), trained(True)
    assert block.begin_cycle() > per_token.begin_cycle()
    assert block.begin_cycle() >= 12  # verification is nearly flat and the block costs one call


def test_policy_prepare_measures_nothing_without_a_model():
    from dllm_spec.latency import LatencyCurve, LatencySurface

    surface = LatencySurface({1: LatencyCurve({1: 1.0, 8: 2.0}), 4: LatencyCurve({1: 2.0, 8: 6.0})})
    assert surface(1, 2) == pytest.approx(1.0 + (2.0 - 1.0) / 3)  # between the row counts
    assert surface(8, 8) == pytest.approx(12.0)  # past the largest measured batch: grows with the rows
    policy = CostAwarePolicy(max_k=4, latency=surface)
    policy.prepare(16)
    assert sorted(policy.latency.curves) == [1, 4]


def test_batch_aware_policy_shrinks_the_draft_as_the_batch_becomes_compute_bound():
    """One cap K for the whole batch from the (tokens, rows) latency: on a surface where a batch of
    16 is compute-bound the same confident drafts are verified shorter, and not at all once
    speculation stops paying (plain batched decoding)."""
    from dllm_spec.latency import LatencyCurve, LatencySurface
    from dllm_spec.verify.proposal import DraftProposal

    surface = LatencySurface(
        {
            1: LatencyCurve({1: 0.02, 8: 0.022, 16: 0.025}),
            16: LatencyCurve({1: 0.03, 2: 0.045, 4: 0.07, 8: 0.13, 16: 0.25}),
        }
    )
    policy = CostAwarePolicy(max_k=8, latency=surface)

    def chosen(rows: int, confidence: float) -> int:
        proposal = DraftProposal(torch.zeros((rows, 8), dtype=torch.long), None, torch.full((rows, 8), confidence))
        return max(policy.choose(proposal))

    assert chosen(1, 0.9) == 8
    assert 0 < chosen(16, 0.9) < 8
    assert chosen(16, 0.3) == 0


def test_a_batch_stops_verifying_when_its_verified_cycles_lose_to_plain_batched_steps():
    """The estimate says verifying pays (confident drafts, half of them accepted), but the verify
    forwards take three times what the surface says: the batch gate sees the cycles that verified
    drafts commit fewer tokens per second than a plain batched step and backs off to rare probes.
    With the timings the surface promised it keeps verifying."""
    from dllm_spec.latency import LatencyCurve, LatencySurface

    def run(slowdown: float, cycles: int = 150) -> tuple[list[int], CostAwarePolicy]:
        curves = {1: LatencyCurve({1: 0.02, 16: 0.025}, momentum=1.0)}
        curves[16] = LatencyCurve({1: 0.03, 2: 0.033, 4: 0.04, 8: 0.06, 16: 0.1}, momentum=1.0)
        policy = CostAwarePolicy(max_k=8, latency=LatencySurface(curves))
        caps = []
        for _ in range(cycles):
            k = policy.begin_cycle(16)
            proposal = DraftProposal(torch.zeros((16, k), dtype=torch.long), None, torch.full((16, k), 0.9))
            verified = policy.choose(proposal)
            cap = max(verified)
            caps.append(cap)
            seconds = policy.latency(cap + 1, 16) * (slowdown if cap else 1.0)
            policy.observe(proposal, verified, [v // 2 for v in verified], 1e-5, seconds)
        return caps, policy

    caps, slow = run(3.0)
    assert 0 < sum(c > 0 for c in caps[50:]) < 10  # rare probes
    assert slow.batch_gate(16).gain < 1.0 and slow.batch_gate(12) is slow.batch_gate(16)
    caps, fine = run(1.0)
    assert sum(c > 0 for c in caps[50:]) > 90 and fine.batch_gate(16).gain > 1.0


def test_a_latency_curve_that_disagrees_with_live_timings_is_measured_again(tmp_path):
    """A wrong cached curve (here: absurdly fast) is re-measured once live timings keep disagreeing
    with it, and the new curve replaces the cached one. Live timings that still disagree after that
    never trigger a second measurement; live timings a few times slower than the curve (long
    contexts) never trigger one."""
    from dllm_spec.latency import LatencyCurve, LatencySurface, load_or_measure
    from tests.conftest import tiny_llama

    model = tiny_llama(0)
    surface = LatencySurface({1: LatencyCurve({1: 1e-9, 2: 2e-9})}, model=model, cache_dir=tmp_path)
    for _ in range(19):
        surface.observe(1, 0.01)
    assert not surface.stale  # not on a few timings
    surface.observe(1, 0.01)
    assert surface.stale == {1} and surface.remeasured == 0  # never inside a generation
    surface.ensure(1)  # the start of the next one
    assert surface.remeasured == 1 and not surface.stale and surface(1) > 1e-6
    assert load_or_measure(model, tmp_path).points == surface.curves[1].points  # cached for the next process
    for _ in range(40):
        surface.observe(1, 100 * surface(1))  # far slower than measured, for a lasting reason
    assert not surface.stale and surface.remeasured == 1
    steady = LatencySurface({1: LatencyCurve({1: 0.01, 2: 0.02})}, model=model, cache_dir=tmp_path)
    for _ in range(50):
        steady.observe(1, 0.011)
    assert not steady.stale
    measured = {k: 0.01 * (1 + k / 16) for k in range(1, 17)}
    long_contexts = LatencySurface({16: LatencyCurve(dict(measured))}, model=model, cache_dir=tmp_path)
    for i in range(80):
        k = 1 + i % 16  # the policy's many draft lengths: each point folds in live timings only now and then
        long_contexts.observe(k, 2.5 * measured[k], rows=16)  # what 1K-token contexts cost, not a wrong curve
    assert not long_contexts.stale


def test_the_gate_keeps_a_drafter_that_pays_on_average_through_runs_of_misses_and_drops_one_that_loses():
    """Drafted cycles commit 4 tokens, then 1, 1, 1 (runs of three misses), each in 1.6 plain steps'
    time: 1.09x a plain step on average, so drafting pays. The gate (about ten cycles of memory)
    never calls it losing; a three-cycle memory does after every run of misses. Cycles of 1, 1, 2
    tokens in 1.6 steps (0.83x) are losing within a few cycles."""
    pays, short, loses = ProbeGate(), ProbeGate(), ProbeGate()
    flags = {"pays": [], "short": [], "loses": []}
    for i in range(80):
        pays.update([4.0, 1.0, 1.0, 1.0][i % 4], 1.6, 0.9, 4, 64)
        short.update([4.0, 1.0, 1.0, 1.0][i % 4], 1.6, 0.7, 4, 64)
        loses.update([1.0, 1.0, 2.0][i % 3], 1.6, 0.9, 4, 64)
        for name, gate in (("pays", pays), ("short", short), ("loses", loses)):
            flags[name].append(gate.losing)
    assert not any(flags["pays"]) and 1.0 < pays.gain < 1.2
    assert sum(flags["short"][8:]) > 20
    assert all(flags["loses"][10:]) and 0.75 < loses.gain < 0.9
