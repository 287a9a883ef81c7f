"""Block-diffusion drafter (drafters/block_diffusion.py): the drafter contract, greedy exactness and
sampling losslessness through the loop, save/load round trip, drafts after skipped cycles, and
the error for a drafter trained for another target."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.drafters.schedulers import ConfidenceUnmaskingScheduler, LeftToRightUnmaskingScheduler
from dllm_spec.policy import CostAwarePolicy, FixedLength
from dllm_spec.verify.sampling import SamplingParams
from tests.conftest import (
    VOCAB,
    begin,
    commit,
    make_drafter,
    prefill,
    propose,
    sampling_target,
    tiny_llama,
    two_token_total_variation,
)


@pytest.mark.parametrize("steps,vocab", [(1, 0), (3, 0), (2, 12)])
def test_greedy_output_equals_plain_greedy_with_block_diffusion(target, steps, vocab):
    drafter = make_drafter(target, steps, draft_vocab=vocab)
    for policy in (FixedLength(5), CostAwarePolicy(max_k=5)):
        spec = DiffusionSpeculator(target, None, drafter, policy=policy)
        prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
        ref = target.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=1)[0, 8:]
        out = spec.generate(prompt, max_new_tokens=30)
        assert out.token_ids[0].tolist() == ref.tolist()


def test_drafter_contract(target):
    """Shapes, ids inside the vocabulary (no mask id), committed prefix untouched, determinism."""
    for drafter in (make_drafter(target, 1), make_drafter(target, 3), make_drafter(target, 2, draft_vocab=12)):
        spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5))
        from dllm_spec.verify.verifier import Verifier

        verifier = Verifier(target, drafter.target_layer_ids)
        ids = torch.tensor([[0, 3, 4, 5, 6]])
        begin(drafter, ids, prefill(verifier, ids))
        before = ids.clone()
        for sampling in (SamplingParams(), SamplingParams(1.0)):
            a = propose(drafter, ids, 4, sampling, torch.Generator().manual_seed(0))
            b = propose(drafter, ids, 4, sampling, torch.Generator().manual_seed(0))
            assert a.tokens.shape == (1, 4) and a.confidence.shape == (1, 4)
            assert torch.equal(a.tokens, b.tokens)
            assert int(a.tokens.min()) >= 0 and int(a.tokens.max()) < VOCAB
            if drafter.model.draft_vocab.numel():
                assert set(a.tokens.flatten().tolist()) <= set(drafter.model.draft_vocab.tolist())
            if a.q is not None:
                assert a.q.shape == (1, 4, VOCAB) and torch.allclose(a.q.sum(-1), torch.ones(1, 4))
        assert torch.equal(ids, before)
        assert spec.drafter is drafter


def test_save_load_round_trip_gives_identical_drafts(target, tmp_path):
    drafter = make_drafter(target, 2, scheduler=LeftToRightUnmaskingScheduler(num_inference_steps=2), draft_vocab=12)
    DiffusionSpeculator(target, None, drafter)
    drafter.save_pretrained(tmp_path / "d")
    loaded = BlockDiffusionDrafter.from_pretrained(tmp_path / "d")
    assert isinstance(loaded.scheduler, LeftToRightUnmaskingScheduler) and loaded.steps == 2
    a = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5)).generate(
        torch.tensor([[0, 4, 8]]), max_new_tokens=12, temperature=1.0, seed=3
    )
    b = DiffusionSpeculator(target, None, loaded, policy=FixedLength(5)).generate(
        torch.tensor([[0, 4, 8]]), max_new_tokens=12, temperature=1.0, seed=3
    )
    assert torch.equal(a.token_ids, b.token_ids)
    assert a.stats.accepted_per_position == b.stats.accepted_per_position


def test_drafter_for_another_target_is_rejected(target, tmp_path):
    other = tiny_llama(9, vocab=VOCAB, layers=3)
    drafter = make_drafter(other, 1)
    with pytest.raises(ValueError, match="trained for another target"):
        DiffusionSpeculator(target, None, drafter)
    wide = tiny_llama(9, vocab=VOCAB + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        DiffusionSpeculator(target, None, make_drafter(wide, 1))
    with pytest.raises(FileNotFoundError, match="no block-diffusion drafter checkpoint"):
        BlockDiffusionDrafter.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    "steps,scheduler",
    [
        (1, None),
        (3, LeftToRightUnmaskingScheduler(num_inference_steps=3)),
        (3, ConfidenceUnmaskingScheduler(num_inference_steps=3)),
    ],
)
def test_sampling_with_block_diffusion_keeps_target_distribution(steps, scheduler):
    target = sampling_target()
    spec = DiffusionSpeculator(target, None, make_drafter(target, steps, scheduler=scheduler), policy=FixedLength(3))
    tv = two_token_total_variation(spec, target, draws=1500, batch=30)
    assert tv < 0.1, f"TV {tv:.3f}"


def test_drafts_after_skipped_cycles_equal_drafts_of_a_fresh_drafter(target, small_drafter_model):
    """When the policy skips drafting, the drafter only sees commit() calls; its next proposal must
    be the one a freshly started drafter makes on the same committed sequence."""
    from dllm_spec.drafters import AutoregressiveDrafter
    from dllm_spec.training.features import compute_features

    ids = [0, 5, 9, 14, 5, 9, 22, 7, 3, 11, 30, 2, 17, 4, 8, 19]
    for make in (lambda: make_drafter(target, 2), lambda: AutoregressiveDrafter(small_drafter_model, name="small-ar")):
        drafter, fresh = make(), make()
        DiffusionSpeculator(target, None, drafter)
        DiffusionSpeculator(target, None, fresh)
        layers = list(drafter.target_layer_ids)
        feats = (
            compute_features(target, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), layers)
            if layers
            else None
        )
        cut = lambda a, b: None if feats is None else feats[:, a:b]  # noqa: E731
        begin(drafter, torch.tensor([ids[:5]]), cut(0, 4))
        propose(drafter, torch.tensor([ids[:5]]), 4, SamplingParams(), None)
        prev = 5
        for end in (
            7,
            8,
            12,
        ):  # three committed cycles, no proposal in between; the target wrote positions prev-1 .. end-2
            commit(drafter, torch.tensor([ids[:end]]), cut(prev - 1, end - 1))
            prev = end
        begin(fresh, torch.tensor([ids[:12]]), cut(0, 11))
        got = propose(drafter, torch.tensor([ids[:12]]), 4, SamplingParams(), None)
        want = propose(fresh, torch.tensor([ids[:12]]), 4, SamplingParams(), None)
        assert got.tokens.tolist() == want.tokens.tolist()
        torch.testing.assert_close(got.confidence, want.confidence, atol=1e-5, rtol=1e-5)


def test_queued_commits_of_ragged_rows_through_a_reorder_equal_committing_each_cycle(target):
    """commit() only queues features; the queue enters the context cache at the next draft in one
    projection. With ragged per-row counts and a reorder (a finished row dropped) while queued, the
    context and the proposals equal those of a drafter that projects every cycle at once."""
    from dllm_spec.drafters.base import Sequences

    lazy, eager = make_drafter(target, 2), make_drafter(target, 2)
    for d in (lazy, eager):
        DiffusionSpeculator(target, None, d)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 24), generator=g)
    feats = torch.randn(3, 24, 2 * target.config.hidden_size, generator=g)
    lengths = [5, 7, 4]

    def step(counts: list[int], index: list[int] | None = None) -> None:
        n = max(counts)
        chunk = torch.stack([feats[r, lengths[r] - 1 : lengths[r] - 1 + n] for r in range(len(counts))])  # (b, n, F)
        for r, c in enumerate(counts):
            lengths[r] += c
        for d in (lazy, eager):
            d.commit(Sequences(ids, list(lengths)), chunk, counts)
        eager._catch_up()
        if index is not None:
            for d in (lazy, eager):
                d.reorder(index)

    for d in (lazy, eager):
        d.begin([0, 1, 2], Sequences(ids, list(lengths)), torch.stack([feats[r, :7] for r in range(3)]), [4, 6, 3])
    step([1, 3, 2])
    step([2, 1, 1], index=[2, 0])  # row 1 finished: rows 2 and 0 remain, in that order
    ids, feats, lengths = ids[[2, 0]], feats[[2, 0]], [lengths[2], lengths[0]]
    step([3, 1])
    step([1, 2])
    assert len(lazy._pending) == 4 and not eager._pending
    seqs = Sequences(ids, list(lengths))
    got, want = (d.propose(seqs, 4, SamplingParams(), [None, None]) for d in (lazy, eager))
    assert not lazy._pending
    assert lazy._ctx.lengths[:2] == eager._ctx.lengths[:2]
    for layer in range(lazy.config.num_hidden_layers):
        for a, b in zip(lazy._ctx.view(layer), eager._ctx.view(layer)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.confidence, want.confidence, atol=1e-5, rtol=1e-5)
