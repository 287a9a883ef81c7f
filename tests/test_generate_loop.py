"""The one generate loop on tiny in-process models: greedy exactness for every drafter (including
an always-right oracle and an always-wrong adversary), stops, cache invariant, bad input."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator, GenerationStats, SpeculatorConfig
from dllm_spec.loop import StopConditions, speculative_decode
from dllm_spec.policy import (
    AssistedHeuristic,
    ConfidenceThreshold,
    CostAwarePolicy,
    FixedLength,
    MovingAverageLength,
)
from drafters import AutoregressiveDrafter, NullDrafter, PromptLookupDrafter
from drafters.base import Drafter, DraftProposal
from tests.conftest import SAMPLING_VOCAB, VOCAB, sampling_target, tiny_llama, two_token_total_variation
from verify.sampling import SamplingParams
from verify.verifier import Verifier

PROMPTS = [[0, 5, 9, 14, 5, 9, 22, 7], [0, 3, 3, 3, 40, 11], [0, 17, 2, 29, 31, 17, 2, 29, 31, 8, 12]]


class OracleDrafter(Drafter):
    """Proposes the target's own greedy continuation (always right); ``wrong=True`` shifts every
    token by one (always wrong)."""

    def __init__(self, target, wrong: bool = False) -> None:
        self.inner = AutoregressiveDrafter(target, name="oracle")
        self.wrong = wrong
        self.name = "adversary" if wrong else "oracle"

    def begin(self, rows, seqs, features, counts):
        self.inner.begin(rows, seqs, features, counts)

    def reorder(self, index):
        self.inner.reorder(index)

    def propose(self, seqs, max_tokens, sampling, generators):
        proposal = self.inner.propose(seqs, max_tokens, SamplingParams(), generators)
        if self.wrong:
            proposal.tokens = (proposal.tokens + 1) % VOCAB
            proposal.q = None
        return proposal


def reference(target, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = target.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    return out[0, len(prompt):].tolist()


def drafters_for(target, small):
    return {
        "none": NullDrafter(),
        "prompt-lookup": PromptLookupDrafter(),
        "small-ar": AutoregressiveDrafter(small, name="small-ar"),
        "early-exit": AutoregressiveDrafter.from_target_layers(target, 1),
        "oracle": OracleDrafter(target),
        "adversary": OracleDrafter(target, wrong=True),
    }


POLICIES = {
    "fixed-1": lambda: FixedLength(1),
    "fixed-4": lambda: FixedLength(4),
    "fixed-9": lambda: FixedLength(9),
    "adaptive": lambda: CostAwarePolicy(max_k=12),
    "threshold": lambda: ConfidenceThreshold(0.3, max_k=8),
    "moving-average": lambda: MovingAverageLength(max_k=8),
    "heuristic": lambda: AssistedHeuristic(max_k=8),
}


GREEDY_CASES = [(name, policy) for name in ["none", "prompt-lookup", "small-ar", "early-exit", "oracle", "adversary"]
                for policy in ["fixed-1", "fixed-9", "adaptive"]]
GREEDY_CASES += [(name, policy) for name in ["small-ar", "oracle"] for policy in ["fixed-4", "threshold", "moving-average", "heuristic"]]


@pytest.mark.parametrize("name,policy", GREEDY_CASES)
def test_greedy_output_equals_plain_greedy(target, small_drafter_model, name, policy):
    drafter = drafters_for(target, small_drafter_model)[name]
    spec = DiffusionSpeculator(target, None, drafter, policy=POLICIES[policy]())
    for prompt in PROMPTS:
        out = spec.generate(torch.tensor([prompt]), max_new_tokens=40, stop_token_ids=None)
        assert out.token_ids[0].tolist() == reference(target, prompt, 40), f"{name} diverged on {prompt}"
        assert out.stats.new_tokens == 40


def test_oracle_accepts_whole_blocks_and_adversary_none(target, small_drafter_model):
    d = drafters_for(target, small_drafter_model)
    oracle = DiffusionSpeculator(target, None, d["oracle"], policy=FixedLength(7)).generate(torch.tensor([PROMPTS[0]]), max_new_tokens=32)
    adversary = DiffusionSpeculator(target, None, d["adversary"], policy=FixedLength(7)).generate(torch.tensor([PROMPTS[0]]), max_new_tokens=32)
    assert oracle.stats.tau == 8.0 and oracle.stats.target_forwards == 4
    assert adversary.stats.tau == 1.0 and adversary.stats.accepted_tokens == 0
    assert oracle.stats.accepted_per_position == [4] * 7


@pytest.mark.parametrize("max_new", [1, 2, 7, 8, 9, 23])
def test_max_new_tokens_is_honoured_exactly(target, max_new):
    spec = DiffusionSpeculator(target, None, OracleDrafter(target), policy=FixedLength(8))
    out = spec.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=max_new)
    assert out.token_ids.shape == (1, max_new)
    assert out.token_ids[0].tolist() == reference(target, PROMPTS[1], max_new)
    assert out.stats.stop_reason == "length"


def test_stop_token_inside_an_accepted_block_ends_generation_there(target):
    prompt = PROMPTS[0]
    ref = reference(target, prompt, 40)
    position = 10
    stop_id = ref[position]
    first = ref.index(stop_id)  # the earliest occurrence is where it must stop
    spec = DiffusionSpeculator(target, None, OracleDrafter(target), policy=FixedLength(8))
    out = spec.generate(torch.tensor([prompt]), max_new_tokens=40, stop_token_ids=[stop_id])
    assert out.token_ids[0].tolist() == ref[: first + 1]
    assert out.stats.stop_reason == "eos"
    # the oracle's block ran past the stop token: the loop must have cut it
    assert out.stats.accepted_tokens + out.stats.target_forwards > out.stats.new_tokens


class CacheInvariant(Drafter):
    """Wraps a drafter; after every cycle checks that each row's target cache holds every committed
    token of the row but the last (the verifier's invariant)."""

    def __init__(self, inner, verifier):
        self.inner, self.verifier, self.cycles = inner, verifier, 0
        self.name, self.tree_width, self.target_layer_ids = inner.name, inner.tree_width, inner.target_layer_ids

    def begin(self, rows, seqs, features, counts):
        self.inner.begin(rows, seqs, features, counts)

    def reorder(self, index):
        self.inner.reorder(index)

    def propose(self, seqs, max_tokens, sampling, generators):
        return self.inner.propose(seqs, max_tokens, sampling, generators)

    def commit(self, seqs, features, counts):
        self.cycles += 1
        assert self.verifier.cache.batch == seqs.batch
        for r in range(seqs.batch):
            assert self.verifier.cache.lengths[r] == seqs.lengths[r] - 1, (self.name, r)
        self.inner.commit(seqs, features, counts)


@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_target_cache_holds_all_committed_tokens_but_the_last_after_every_cycle(target, small_drafter_model, max_batch):
    from dllm_spec.loop import Request

    for drafter in drafters_for(target, small_drafter_model).values():
        verifier = Verifier(target, max_batch=max_batch)
        checked = CacheInvariant(drafter, verifier)
        requests = [Request(torch.tensor(p)) for p in PROMPTS + PROMPTS[:1]]
        stop = StopConditions(30, frozenset(), 256)
        produced = [0] * len(requests)
        for event in speculative_decode(verifier, checked, FixedLength(5), requests, stop, SamplingParams(), max_batch):
            produced[event.request] += event.tokens.numel()
        assert produced == [30] * len(requests) and checked.cycles > 0

def test_streamer_receives_prompt_then_every_new_token(target):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    spec = DiffusionSpeculator(target, None, OracleDrafter(target), policy=FixedLength(4))
    out = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, streamer=rec)
    assert rec.chunks[0] == [PROMPTS[0]] and rec.ended
    assert sum((c[0] for c in rec.chunks[1:]), []) == out.token_ids[0].tolist()


def test_sampling_is_deterministic_under_a_seed(target, small_drafter_model):
    spec = DiffusionSpeculator(target, None, AutoregressiveDrafter(small_drafter_model), policy=FixedLength(4))
    a = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=20, temperature=1.0, seed=7)
    b = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=20, temperature=1.0, seed=7)
    c = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=20, temperature=1.0, seed=8)
    assert torch.equal(a.token_ids, b.token_ids) and not torch.equal(a.token_ids, c.token_ids)


@pytest.mark.parametrize("mode,policy", [("token", "fixed"), ("block", "fixed"), ("token", "adaptive")])
def test_sampled_loop_follows_target_distribution(mode, policy):
    """End to end through the loop: the first two sampled tokens follow the target's exact joint
    distribution (enumerated), with an AR drafter whose q differs from p."""
    target = sampling_target()
    drafter = AutoregressiveDrafter(tiny_llama(4, vocab=SAMPLING_VOCAB, hidden=16, layers=1))
    chosen = FixedLength(3) if policy == "fixed" else CostAwarePolicy(max_k=4)
    spec = DiffusionSpeculator(target, None, drafter, SpeculatorConfig(verification=mode), policy=chosen)
    tv = two_token_total_variation(spec, target, draws=2500)
    assert tv < 0.08, f"TV {tv:.3f}"


# ---- bad input ------------------------------------------------------------------------------------
class CharTokenizer:
    """A minimal tokenizer for error-path tests."""

    chat_template = None
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] + [3 + (ord(c) % 40) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i % 26)) for i in ids)

    def get_vocab(self):
        return {str(i): i for i in range(VOCAB)}


def test_bad_input_raises_clear_errors(target):
    spec = DiffusionSpeculator(target, CharTokenizer(), PromptLookupDrafter())
    with pytest.raises(ValueError, match="empty prompt"):
        spec.generate("   ")
    with pytest.raises(ValueError, match="empty prompt"):
        spec.generate(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        spec.generate("hello", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        spec.generate("hello", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        spec.generate("hello", temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        spec.generate("hello", temperature=1.0, top_p=1.2)
    with pytest.raises(ValueError, match="prompt too long"):
        spec.generate(torch.zeros((1, 300), dtype=torch.long))
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        spec.generate(torch.tensor([[0, VOCAB + 5]]))
    with pytest.raises(ValueError, match="block_size"):
        SpeculatorConfig(block_size=-1)
    with pytest.raises(ValueError, match="verification"):
        SpeculatorConfig(verification="tree")


def test_vocabulary_mismatch_between_drafter_and_target_is_rejected(target):
    other = tiny_llama(5, vocab=VOCAB + 16)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        DiffusionSpeculator(target, None, AutoregressiveDrafter(other))


def test_generation_stops_at_the_context_limit(target):
    spec = DiffusionSpeculator(target, None, OracleDrafter(target), policy=FixedLength(8))
    out = spec.generate(torch.zeros((1, 250), dtype=torch.long), max_new_tokens=50)
    assert out.stats.new_tokens == 6 and out.stats.stop_reason == "context"


# ---- block-length policies --------------------------------------------------------------------------
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
            k = policy.draft_length()
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
    free = CostAwarePolicy(max_k=8, latency=LatencyCurve(dict(curve), momentum=1.0))  # prompt-lookup-like: drafting is free
    assert all(k > 0 for k in run(free, accept_all=False, draft_s=1e-5))


def test_skipped_drafting_cycles_keep_greedy_output_exact(target, small_drafter_model):
    from dllm_spec.latency import LatencyCurve

    ref = reference(target, PROMPTS[0], 40)
    for drafter in (OracleDrafter(target, wrong=True), AutoregressiveDrafter(small_drafter_model, name="small-ar")):
        policy = CostAwarePolicy(max_k=6, latency=LatencyCurve({1: 0.001, 2: 1.0}, momentum=1.0))  # drafting never pays
        out = DiffusionSpeculator(target, None, drafter, policy=policy).generate(torch.tensor([PROMPTS[0]]), max_new_tokens=40)
        assert out.token_ids[0].tolist() == ref
        assert policy.skipped > 0


def test_stats_record_policy_predictions_for_calibration(target):
    spec = DiffusionSpeculator(target, None, OracleDrafter(target), policy=CostAwarePolicy(max_k=8))
    out = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=30)
    s = out.stats
    assert len(s.predicted_accepted) == s.target_forwards == len(s.observed_accepted)
    assert s.calibration_error is not None and s.calibration_error >= 0


@pytest.mark.parametrize("bad", [lambda: FixedLength(-1), lambda: ConfidenceThreshold(1.5), lambda: CostAwarePolicy(max_k=0),
                                 lambda: MovingAverageLength(momentum=1.0), lambda: AssistedHeuristic(k=0)])
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
        k = policy.draft_length()
        assert k > 0
        source = "lookup" if cycle % 3 == 0 else "diffusion"
        if source == "diffusion":
            allowed = policy.should_draft("diffusion")
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
        policy.stats("lookup").calibrator(torch.tensor([0.9]))[0])  # same confidence, learnt apart


def test_default_drafter_is_prompt_lookup_for_a_target_the_shipped_drafter_does_not_fit(target):
    from drafters import PromptLookupDrafter

    assert type(DiffusionSpeculator(target, None).drafter) is PromptLookupDrafter  # the tiny target: other sizes


def test_cost_aware_policy_drafts_longer_blocks_when_a_draft_costs_the_same_at_any_length():
    """Same total draft time and acceptance: a block drafter (one forward per block) is asked for a
    longer draft than a token-by-token drafter (one forward per token), whose cost grows with k."""
    from dllm_spec.latency import LatencyCurve

    def trained(forwards_per_token: bool) -> CostAwarePolicy:
        policy = CostAwarePolicy(max_k=16, latency=LatencyCurve({1: 0.05, 16: 0.06}, momentum=1.0))
        for _ in range(20):
            k = 8
            proposal = DraftProposal(torch.zeros((1, k), dtype=torch.long), None, torch.full((1, k), 0.8),
                                     forwards=k if forwards_per_token else 1)
            policy.observe(proposal, verified=[k], accepted=[5], draft_time_s=0.04, verify_time_s=0.055)
        return policy

    block, per_token = trained(False), trained(True)
    assert block.draft_length() > per_token.draft_length()
    assert block.draft_length() >= 12  # verification is nearly flat and the block costs one call
