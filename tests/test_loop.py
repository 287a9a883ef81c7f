"""The batched loop (dllm_spec/loop.py) on tiny in-process models: every row of a batch gives that row's
single-sequence greedy output and transformers' greedy, for every drafter and policy, with rows of
different prompt lengths, rows that stop at different cycles and refilled slots (continuous
batching); sampled rows follow the target's distribution and do not depend on their neighbours;
``min_new_tokens`` / ``ignore_eos``; bad batched input."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator, SpeculatorConfig
from dllm_spec.drafters import AutoregressiveDrafter, FallbackDrafter, GraftDrafter, NullDrafter, PromptLookupDrafter
from dllm_spec.policy import CostAwarePolicy, FixedLength
from tests.conftest import SAMPLING_VOCAB, make_drafter, sampling_target

# different lengths, repeats (prompt lookup finds matches) and no repeats
PROMPTS = [
    [0, 5, 9, 14, 5, 9, 22, 7],
    [0, 3, 3, 3, 40, 11],
    [0, 17, 2, 29, 31, 17, 2, 29, 31, 8, 12],
    [0, 44],
    [0, 8, 8, 21, 30, 2, 6, 9, 10, 4, 4, 21, 30, 2],
]


def reference(target, prompt: list[int], n: int, **kwargs) -> list[int]:
    out = target.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=1, **kwargs)
    return out[0, len(prompt) :].tolist()


def drafters(target, small):
    return {
        "none": lambda: NullDrafter(),
        "prompt-lookup": lambda: PromptLookupDrafter(),
        "small-ar": lambda: AutoregressiveDrafter(small, name="small-ar"),
        "early-exit": lambda: AutoregressiveDrafter.from_target_layers(target, 1),
        "block-diffusion": lambda: make_drafter(target, 1),
        "block-diffusion-2-steps": lambda: make_drafter(target, 2, draft_vocab=12),
        "tree": lambda: make_drafter(target, 1, tree_width=3),
        "pair": lambda: FallbackDrafter(PromptLookupDrafter(), make_drafter(target, 1)),
        "tree-pair": lambda: GraftDrafter(PromptLookupDrafter(), make_drafter(target, 1, tree_width=3)),
    }


POLICIES = {
    "fixed-1": lambda: FixedLength(1),
    "fixed-5": lambda: FixedLength(5),
    "adaptive": lambda: CostAwarePolicy(max_k=5),
}
CASES = [
    (d, p)
    for d in [
        "none",
        "prompt-lookup",
        "small-ar",
        "early-exit",
        "block-diffusion",
        "block-diffusion-2-steps",
        "tree",
        "pair",
        "tree-pair",
    ]
    for p in POLICIES
]


@pytest.mark.parametrize("name,policy", CASES)
def test_every_row_of_a_batch_equals_its_single_sequence_greedy_output(target, small_drafter_model, name, policy):
    make = drafters(target, small_drafter_model)[name]
    ref = [reference(target, p, 24) for p in PROMPTS]
    single = DiffusionSpeculator(target, None, make(), policy=POLICIES[policy]())
    for prompt, want in zip(PROMPTS, ref):
        assert single.generate(torch.tensor([prompt]), max_new_tokens=24).token_ids[0].tolist() == want
    spec = DiffusionSpeculator(target, None, make(), policy=POLICIES[policy]())
    batch = spec.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=24)
    assert [o.token_ids[0].tolist() for o in batch] == ref
    # continuous batching: 10 requests through 3 slots, slots refilled as rows finish
    refill = spec.generate([torch.tensor(p) for p in PROMPTS * 2], max_new_tokens=24, batch_size=3)
    assert [o.token_ids[0].tolist() for o in refill] == ref * 2
    assert all(o.stats.new_tokens == 24 and o.stats.stop_reason == "length" for o in refill)
    assert refill.stats.new_tokens == 24 * len(PROMPTS) * 2


@pytest.mark.parametrize("name", ["prompt-lookup", "small-ar", "tree-pair"])
def test_rows_that_stop_at_different_cycles_free_their_slots_for_waiting_prompts(target, small_drafter_model, name):
    """A stop id ends each row wherever it first appears in that row (some rows never see it)."""
    refs = [reference(target, p, 30) for p in PROMPTS]
    stop_id = refs[0][7]
    want = []
    for r in refs:
        cut = r.index(stop_id) + 1 if stop_id in r else len(r)
        want.append(r[:cut])
    assert len({len(w) for w in want}) > 1  # the rows really stop at different points
    spec = DiffusionSpeculator(target, None, drafters(target, small_drafter_model)[name](), policy=FixedLength(4))
    out = spec.generate(
        [torch.tensor(p) for p in PROMPTS * 2], max_new_tokens=30, stop_token_ids=[stop_id], batch_size=3
    )
    assert [o.token_ids[0].tolist() for o in out] == want * 2
    assert [o.stats.stop_reason for o in out] == ["eos" if stop_id in r else "length" for r in refs] * 2


def test_batched_input_ids_with_an_attention_mask_take_each_row_without_its_padding(target):
    spec = DiffusionSpeculator(target, None, PromptLookupDrafter(), policy=FixedLength(4))
    a, b = PROMPTS[0], PROMPTS[1]
    width = max(len(a), len(b))
    ids = torch.tensor([[1] * (width - len(a)) + a, b + [1] * (width - len(b))])  # one row left-, one right-padded
    mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a), [1] * len(b) + [0] * (width - len(b))])
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert [o.token_ids[0].tolist() for o in out] == [reference(target, a, 16), reference(target, b, 16)]


@pytest.mark.parametrize("sampling", ["speculative", "reproducible"])
def test_sampled_rows_of_a_batch_follow_the_target_distribution(sampling):
    """First two sampled tokens of many rows of ONE batch (each row its own seed) against the
    target's exact joint: every row is a draw from the target, with chains and trees, under either
    sampling method."""
    target = sampling_target()
    prompt = [0, 2, 3]
    vocab = SAMPLING_VOCAB
    ids = torch.tensor([prompt])
    with torch.no_grad():
        p1 = target(ids).logits[0, -1].softmax(-1)
        exact = torch.stack(
            [p1[a] * target(torch.cat([ids, torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1) for a in range(vocab)]
        ).flatten()
    for drafter in (PromptLookupDrafter(), make_drafter(target, 1), make_drafter(target, 1, tree_width=3)):
        spec = DiffusionSpeculator(
            target, None, drafter, policy=FixedLength(3), config=SpeculatorConfig(max_batch_size=64)
        )
        counts = torch.zeros(vocab * vocab)
        draws = 0
        for seed in range(0, 3008, 64):  # 47 batches of 64 rows: null TV ~0.045, a lossy rule is far above 0.08
            out = spec.generate(
                [torch.tensor(prompt)] * 64, max_new_tokens=2, temperature=1.0, seed=seed * 1000, sampling=sampling
            )
            for o in out:
                t = o.token_ids[0]
                counts[t[0] * vocab + t[1]] += 1
                draws += 1
        tv = float(0.5 * (counts / draws - exact).abs().sum())
        assert tv < 0.08, (drafter.name, tv)


REPRODUCIBLE_DRAFTERS = [
    "none",
    "prompt-lookup",
    "small-ar",
    "block-diffusion",
    "block-diffusion-2-steps",
    "tree",
    "tree-pair",
]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_a_seed_gives_the_same_text_whatever_the_drafter_batch_or_speculation(
    target, small_drafter_model, temperature, top_p
):
    """Reproducible sampling (fp32): a row's text is a function of its seed alone, the same with every
    drafter and policy, alone or beside other rows, in any batch size, with speculation on or off,
    and as sample 0 of num_return_sequences."""
    made = drafters(target, small_drafter_model)
    kw = dict(max_new_tokens=24, temperature=temperature, top_p=top_p, sampling="reproducible")
    prompts = [torch.tensor(p) for p in PROMPTS]
    plain = DiffusionSpeculator(target, None, NullDrafter(), policy=FixedLength(0))
    want = [plain.generate(p[None], seed=11 + i, **kw).token_ids[0].tolist() for i, p in enumerate(prompts)]
    assert len({tuple(w) for w in want}) == len(want)  # different seeds, different texts
    for name in REPRODUCIBLE_DRAFTERS:
        for policy in (FixedLength(5), CostAwarePolicy(max_k=5)):
            spec = DiffusionSpeculator(target, None, made[name](), policy=policy)
            for batch_size in (1, 2, 5):
                out = spec.generate(prompts, seed=11, batch_size=batch_size, **kw)
                assert [o.token_ids[0].tolist() for o in out] == want, (name, type(policy).__name__, batch_size)
            samples = spec.generate(prompts[1], seed=12, num_return_sequences=3, **kw)
            assert samples[0].token_ids[0].tolist() == want[1] and samples[0].stats.seed == 12
            assert samples[1].token_ids[0].tolist() != want[1]


def test_an_unseeded_sample_records_the_seed_that_reproduces_it(target):
    spec = DiffusionSpeculator(target, None, PromptLookupDrafter(), policy=FixedLength(4))
    first = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=20, temperature=1.0)
    again = spec.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=20, temperature=1.0, seed=first.stats.seed)
    assert isinstance(first.stats.seed, int) and torch.equal(first.token_ids, again.token_ids)


def test_samples_of_a_prompt_share_one_prefill(target):
    """num_return_sequences N: the prompt runs through the target once; its cache rows are copied."""
    spec = DiffusionSpeculator(target, None, NullDrafter(), config=SpeculatorConfig(max_batch_size=8))
    calls = []
    hook = target.model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        out = spec.generate(torch.tensor(PROMPTS[2]), max_new_tokens=1, temperature=1.0, seed=3, num_return_sequences=4)
    finally:
        hook.remove()
    assert len(out) == 4 and [s for s in calls if s[1] > 1] == [torch.Size([1, len(PROMPTS[2]) - 1])]


def test_a_sampled_row_does_not_depend_on_its_batch_neighbours(target):
    """With a fixed verified length, row i of a batch seeded s equals the single run seeded s + i."""
    spec = DiffusionSpeculator(target, None, PromptLookupDrafter(), policy=FixedLength(4))
    batch = spec.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=20, temperature=0.8, seed=7)
    for i, prompt in enumerate(PROMPTS):
        alone = spec.generate(torch.tensor([prompt]), max_new_tokens=20, temperature=0.8, seed=7 + i)
        assert batch[i].token_ids.tolist() == alone.token_ids.tolist()


def test_min_new_tokens_and_ignore_eos_match_transformers(target):
    prompt = PROMPTS[0]
    ref = reference(target, prompt, 30)
    stop_id = ref[3]
    spec = DiffusionSpeculator(target, None, PromptLookupDrafter(), policy=FixedLength(4))
    # min_new_tokens: the stop id cannot end the row before 12 tokens (its logit is suppressed, as in transformers)
    want = reference(target, prompt, 30, eos_token_id=stop_id, min_new_tokens=12)
    got = spec.generate(torch.tensor([prompt]), max_new_tokens=30, stop_token_ids=[stop_id], min_new_tokens=12)
    assert got.token_ids[0].tolist() == want and len(want) >= 12
    batch = spec.generate([torch.tensor(prompt)] * 3, max_new_tokens=30, stop_token_ids=[stop_id], min_new_tokens=12)
    assert all(o.token_ids[0].tolist() == want for o in batch)
    # ignore_eos: the stop id is emitted and generation goes on to max_new_tokens
    out = spec.generate(torch.tensor([prompt]), max_new_tokens=30, stop_token_ids=[stop_id], ignore_eos=True)
    assert out.token_ids[0].tolist() == ref and out.stats.stop_reason == "length"


def test_bad_batched_input_is_a_clear_error(target):
    spec = DiffusionSpeculator(target, None, PromptLookupDrafter(), config=SpeculatorConfig(max_batch_size=4))
    with pytest.raises(ValueError, match="max_batch_size"):
        spec.generate(torch.zeros((5, 3), dtype=torch.long))
    with pytest.raises(ValueError, match="row 1 .* empty"):
        spec.generate(torch.tensor([[0, 2], [0, 3]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        spec.generate(torch.tensor([[0, 2], [0, 3]]), attention_mask=torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="prompt 1: empty"):
        spec.generate([torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="batch_size"):
        spec.generate([torch.tensor([0, 2])] * 2, batch_size=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        spec.generate([torch.tensor([0, 2])] * 8, batch_size=8)

    class PadTokenizer:
        pad_token_id = 1
        chat_template = None
        eos_token_id = None

    padded = DiffusionSpeculator(target, PadTokenizer(), PromptLookupDrafter())
    with pytest.raises(ValueError, match="attention_mask"):
        padded.generate(torch.tensor([[1, 1, 0, 2], [0, 3, 4, 5]]))  # row 0 is left-padded: which ids are real?
