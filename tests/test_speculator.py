"""DiffusionSpeculator.generate and the one loop on tiny in-process models, one sequence at a time: greedy exactness for every drafter (including
an always-right oracle and an always-wrong adversary), stops, cache invariant, bad input."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator, SpeculatorConfig
from dllm_spec.drafters import AutoregressiveDrafter, NullDrafter, PromptLookupDrafter
from dllm_spec.drafters.base import Drafter
from dllm_spec.loop import StopConditions, speculative_decode
from dllm_spec.policy import (
    AssistedHeuristic,
    ConfidenceThreshold,
    CostAwarePolicy,
    FixedLength,
    MovingAverageLength,
)
from dllm_spec.verify.sampling import SamplingParams
from dllm_spec.verify.verifier import Verifier
from tests.conftest import SAMPLING_VOCAB, VOCAB, CharTokenizer, sampling_target, tiny_llama, two_token_total_variation

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
    return out[0, len(prompt) :].tolist()


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


GREEDY_CASES = [
    (name, policy)
    for name in ["none", "prompt-lookup", "small-ar", "early-exit", "oracle", "adversary"]
    for policy in ["fixed-1", "fixed-9", "adaptive"]
]
GREEDY_CASES += [
    (name, policy)
    for name in ["small-ar", "oracle"]
    for policy in ["fixed-4", "threshold", "moving-average", "heuristic"]
]


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
    oracle = DiffusionSpeculator(target, None, d["oracle"], policy=FixedLength(7)).generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=32
    )
    adversary = DiffusionSpeculator(target, None, d["adversary"], policy=FixedLength(7)).generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=32
    )
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


@pytest.mark.parametrize(
    "mode,policy,sampling,batch",
    [
        ("token", "fixed", "speculative", 25),
        ("block", "fixed", "speculative", 25),
        ("token", "adaptive", "speculative", 1),
        ("token", "adaptive", "reproducible", 25),
    ],
)
def test_sampled_loop_follows_target_distribution(mode, policy, sampling, batch):
    """End to end through the loop: the first two sampled tokens follow the target's exact joint
    distribution (enumerated), with an AR drafter whose q differs from p, at batch 1 and in batches."""
    target = sampling_target()
    drafter = AutoregressiveDrafter(tiny_llama(4, vocab=SAMPLING_VOCAB, hidden=16, layers=1))
    chosen = FixedLength(3) if policy == "fixed" else CostAwarePolicy(max_k=4)
    spec = DiffusionSpeculator(target, None, drafter, SpeculatorConfig(verification=mode), policy=chosen)
    tv = two_token_total_variation(spec, target, draws=2500, sampling=sampling, batch=batch)
    assert tv < 0.08, f"TV {tv:.3f}"


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors(target):
    spec = DiffusionSpeculator(target, CharTokenizer(eos_token_id=1), PromptLookupDrafter())
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


def test_default_drafter_is_prompt_lookup_for_a_target_the_shipped_drafter_does_not_fit(target):
    from dllm_spec.drafters import PromptLookupDrafter

    assert type(DiffusionSpeculator(target, None).drafter) is PromptLookupDrafter  # the tiny target: other sizes


def test_skipped_drafting_cycles_keep_greedy_output_exact(target, small_drafter_model):
    from dllm_spec.latency import LatencyCurve

    ref = reference(target, PROMPTS[0], 40)
    for drafter in (OracleDrafter(target, wrong=True), AutoregressiveDrafter(small_drafter_model, name="small-ar")):
        policy = CostAwarePolicy(max_k=6, latency=LatencyCurve({1: 0.001, 2: 1.0}, momentum=1.0))  # drafting never pays
        out = DiffusionSpeculator(target, None, drafter, policy=policy).generate(
            torch.tensor([PROMPTS[0]]), max_new_tokens=40
        )
        assert out.token_ids[0].tolist() == ref
        assert policy.skipped > 0


def test_stats_record_policy_predictions_for_calibration(target):
    spec = DiffusionSpeculator(target, None, OracleDrafter(target), policy=CostAwarePolicy(max_k=8))
    out = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=30)
    s = out.stats
    assert len(s.predicted_accepted) == s.target_forwards == len(s.observed_accepted)
    assert s.calibration_error is not None and s.calibration_error >= 0
