"""Training the block-diffusion drafter (dllm_spec/training/block_diffusion.py): the loss falls and
a run resumes, the training forward matches drafting, distillation, resident features, the time
budget and the position cap."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.policy import FixedLength
from dllm_spec.verify.sampling import SamplingParams
from tests.conftest import (
    VOCAB,
    begin,
    fake_distill,
    make_drafter,
    propose,
    tiny_llama,
)


@pytest.mark.slow
def test_training_lowers_the_loss_and_resumes(target, tmp_path):
    from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion

    fake_distill(tmp_path / "data", target)
    cfg = TrainConfig(
        block_size=6,
        num_layers=1,
        num_target_layers=2,
        draft_vocab_size=40,
        anchors_per_seq=6,
        batch_size=4,
        max_steps=40,
        warmup_steps=5,
        eval_every=20,
        checkpoint_every=10,
        eval_sequences=8,
        heldout_mod=6,
        lr=3e-3,
    )
    best = train_block_diffusion(target, tmp_path / "data", tmp_path / "run", cfg, feature_root=tmp_path / "features")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < first * 0.8, (first, last)
    assert any("heldout_tau" in r and "train_tau" in r for r in log)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["final_heldout_tau"] >= 1.0
    drafter = BlockDiffusionDrafter.from_pretrained(best)
    DiffusionSpeculator(target, None, drafter)  # loads and binds
    # resume: a longer budget continues from the saved step instead of starting over
    cfg2 = TrainConfig(**{**cfg.__dict__, "max_steps": 45})
    train_block_diffusion(target, tmp_path / "data", tmp_path / "run", cfg2, feature_root=tmp_path / "features")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 45 and steps.count(41) == 1
    # warm start (weights, no trainer state) on the same data: the incoming weights are scored at
    # step 0, and the run's best/ is never worse than them
    shutil.copytree(best, tmp_path / "warm" / "checkpoint")
    cfg3 = TrainConfig(**{**cfg.__dict__, "max_steps": 4, "eval_every": 4, "lr": 0.5})  # a harmful step size
    train_block_diffusion(target, tmp_path / "data", tmp_path / "warm", cfg3, feature_root=tmp_path / "features")
    warm = [json.loads(line) for line in (tmp_path / "warm" / "train_log.jsonl").read_text().splitlines()]
    first_eval = json.loads((tmp_path / "run" / "eval.json").read_text())["final_heldout_tau"]
    assert warm[0]["step"] == 0 and warm[0]["heldout_tau"] == pytest.approx(first_eval, abs=1e-9)
    assert (
        json.loads((tmp_path / "warm" / "eval.json").read_text())["final_heldout_tau"] >= warm[0]["heldout_tau"] - 1e-9
    )


def test_training_forward_gives_the_drafter_what_drafting_gives_it(target):
    """The training forward (many anchors at once under a block-sparse mask, features from the
    cache layout) matches drafting: for each anchor, propose()'s one-step greedy drafts and
    confidences equal those read off the training states (catches off-by-one context, position
    or last-context-injection errors)."""
    from dllm_spec.training.block_diffusion import TrainConfig
    from dllm_spec.training.block_examples import BlockBatch, block_states
    from dllm_spec.training.features import compute_features
    from dllm_spec.training.sequences import Sequence

    drafter = make_drafter(target, 1)
    with torch.no_grad():
        drafter.model.last_context_proj.weight.normal_(0, 0.5)  # make the injected state matter
    DiffusionSpeculator(target, None, drafter)  # binds
    ids = [0, 5, 9, 14, 5, 9, 22, 7, 3, 11, 30, 2, 17, 4]
    anchors = [3, 6, 8]
    batch = BlockBatch(
        [Sequence(ids, prompt_len=3, greedy=True)],
        TrainConfig(block_size=6, anchors_per_seq=3),
        torch.arange(VOCAB),
        random.Random(0),
        noised=False,
        anchors=[anchors],
    )
    feats = compute_features(
        target, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), list(drafter.target_layer_ids)
    )
    with torch.no_grad():
        logits = (
            block_states(drafter.model, batch, feats, target.get_input_embeddings(), 6) @ target.lm_head.weight.T
        )  # (1, A, 5, V)
    for k, a in enumerate(anchors):
        begin(
            drafter, torch.tensor([ids[: a + 1]]), feats[:, :a]
        )  # as after the prefill: features of all but the last token
        proposal = propose(drafter, torch.tensor([ids[: a + 1]]), 5, SamplingParams(), None)
        assert proposal.tokens[0].tolist() == logits[0, k].argmax(-1).tolist()
        torch.testing.assert_close(proposal.confidence[0], logits[0, k].softmax(-1).amax(-1), atol=1e-4, rtol=1e-4)


def test_distillation_to_a_one_hot_teacher_is_plain_cross_entropy(target):
    from dllm_spec.training.block_diffusion import TrainConfig
    from dllm_spec.training.block_examples import BlockBatch, weighted_loss
    from dllm_spec.training.sequences import Sequence

    ids = [0, 5, 9, 14, 5, 9, 22, 7, 3, 11, 30, 2, 17, 4]
    batch = BlockBatch(
        [Sequence(ids, prompt_len=3, greedy=True)],
        TrainConfig(block_size=6, anchors_per_seq=3),
        torch.arange(VOCAB),
        random.Random(0),
        noised=False,
    )
    states = torch.randn(1, 3, 5, 8)
    head = torch.randn(VOCAB, 8)
    k = 3
    one_hot = torch.cat(
        [
            batch.body_tokens.unsqueeze(-1).float(),
            torch.zeros(1, 3, 5, k - 1),  # ids: label, then 0s
            torch.zeros(1, 3, 5, 1),
            torch.full((1, 3, 5, k - 1), -1e9),
        ],
        dim=-1,
    )  # log-probs: 0, -inf
    plain = weighted_loss(states, batch, head, 7.0)
    torch.testing.assert_close(weighted_loss(states, batch, head, 7.0, one_hot, 1.0, torch.arange(VOCAB)), plain)
    soft = one_hot.clone()
    soft[..., k + 1] = 0.0  # half the mass on token 0: the loss changes
    assert not torch.allclose(weighted_loss(states, batch, head, 7.0, soft, 1.0, torch.arange(VOCAB)), plain)


def test_off_policy_rows_learn_the_teachers_distribution_alone(target):
    """Text the target did not write trains on the target's top-k only: its own tokens (the hard
    labels) do not move the loss, whatever distill_weight the on-policy rows use."""
    from dllm_spec.training.block_diffusion import TrainConfig
    from dllm_spec.training.block_examples import BlockBatch, weighted_loss
    from dllm_spec.training.sequences import Sequence

    cfg = TrainConfig(block_size=6, anchors_per_seq=3)
    ids = [0, 5, 9, 14, 5, 9, 22, 7, 3, 11, 30, 2, 17, 4]
    other = ids[:3] + [(t * 7 + 1) % VOCAB for t in ids[3:]]  # other text after the same prompt

    def loss(tokens, on_policy, weight, teacher):
        batch = BlockBatch(
            [Sequence(tokens, 3, False, on_policy=on_policy)], cfg, torch.arange(VOCAB), random.Random(0), noised=False
        )
        return weighted_loss(states, batch, head, 7.0, teacher, weight, torch.arange(VOCAB), batch.on_policy)

    torch.manual_seed(0)
    states, head = torch.randn(1, 3, 5, 8), torch.randn(VOCAB, 8)
    teacher = torch.cat([torch.randint(0, VOCAB, (1, 3, 5, 4)).float(), torch.randn(1, 3, 5, 4).log_softmax(-1)], -1)
    off = loss(ids, False, 0.0, teacher)
    torch.testing.assert_close(loss(other, False, 0.3, teacher), off)  # the text's tokens do not count
    torch.testing.assert_close(loss(ids, True, 1.0, teacher), off)  # = all-teacher on-policy
    assert not torch.allclose(loss(ids, True, 0.3, teacher), off)
    with pytest.raises(ValueError, match="teacher"):
        loss(ids, False, 0.0, None)


@pytest.mark.slow
def test_training_with_resident_features_follows_the_disk_cache_run(target, tmp_path):
    """Same data, config and seed: resident features (and teacher) give the disk-cache run's losses
    step for step, and write nothing to the disk cache."""
    from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion

    fake_distill(tmp_path / "data", target)
    cfg = TrainConfig(
        block_size=6,
        num_layers=1,
        num_target_layers=2,
        draft_vocab_size=40,
        anchors_per_seq=6,
        batch_size=4,
        max_steps=12,
        warmup_steps=3,
        eval_every=6,
        checkpoint_every=6,
        eval_sequences=8,
        heldout_mod=6,
        lr=3e-3,
        distill_weight=0.5,
        teacher_top_k=4,
    )
    logs = {}
    for name, resident in (("disk", False), ("resident", True)):
        train_block_diffusion(
            target,
            tmp_path / "data",
            tmp_path / name,
            cfg,
            feature_root=tmp_path / f"cache-{name}",
            resident_features=resident,
        )
        logs[name] = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert not (tmp_path / "cache-resident").exists()
    torch.testing.assert_close([r["loss"] for r in logs["resident"]], [r["loss"] for r in logs["disk"]])
    assert [r.get("heldout_tau") for r in logs["resident"]] == [r.get("heldout_tau") for r in logs["disk"]]


def test_a_warm_start_from_another_targets_drafter_is_refused_naming_why(target, tmp_path):
    """The shipped drafter copied into a run for another target: refused before any feature is
    computed, naming the mismatch (not a shape error deep in the feature cache)."""
    from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion

    fake_distill(tmp_path / "data", target, n=6)
    make_drafter(tiny_llama(2, hidden=16), 1).save_pretrained(tmp_path / "run" / "checkpoint")
    with pytest.raises(ValueError, match="built for another target.*hidden size 16"):
        train_block_diffusion(
            target, tmp_path / "data", tmp_path / "run", TrainConfig(heldout_mod=2), feature_root=tmp_path / "f"
        )
    assert not (tmp_path / "f").exists()


def test_capping_positions_keeps_greedy_sequences_first_and_stays_under_the_cap():
    from dllm_spec.training.block_diffusion import TrainConfig
    from dllm_spec.training.sequences import Sequence, cap_positions

    seqs = [Sequence(list(range(10 + i)), 2, greedy=i % 2 == 0, row=i) for i in range(20)]
    greedy_total = sum(len(s.ids) for s in seqs if s.greedy)
    kept = cap_positions(seqs, greedy_total + 25, seed=0)
    assert sum(len(s.ids) for s in kept) <= greedy_total + 25
    assert {s.row for s in kept if s.greedy} == {s.row for s in seqs if s.greedy}
    assert 0 < sum(not s.greedy for s in kept) < 10
    assert cap_positions(seqs, 0, seed=0) == seqs
    with pytest.raises(ValueError, match="max_positions"):
        TrainConfig(max_positions=-1)


@pytest.mark.slow
def test_a_dflash_drafter_trains_from_scratch_and_from_a_converted_dllm_drafter(target, tmp_path):
    """--architecture dflash: a fresh run, and a warm start from a dllm drafter (converted first,
    scored at step 0); both best/ checkpoints export to transformers' layout and draft exactly."""
    from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion

    fake_distill(tmp_path / "data", target)
    cfg = TrainConfig(
        block_size=6,
        num_layers=1,
        num_target_layers=2,
        draft_vocab_size=0,
        anchors_per_seq=6,
        batch_size=4,
        max_steps=20,
        warmup_steps=3,
        eval_every=10,
        checkpoint_every=10,
        eval_sequences=8,
        heldout_mod=6,
        lr=3e-3,
        architecture="dflash",
    )
    fresh = train_block_diffusion(
        target, tmp_path / "data", tmp_path / "fresh", cfg, feature_root=tmp_path / "features"
    )
    make_drafter(target, 1).save_pretrained(tmp_path / "warm" / "checkpoint")  # a dllm drafter
    warm = train_block_diffusion(target, tmp_path / "data", tmp_path / "warm", cfg, feature_root=tmp_path / "features")
    log = [json.loads(line) for line in (tmp_path / "warm" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "heldout_tau" in log[0]
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    ref = target.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=1)[0, 8:]
    for best in (fresh, warm):
        drafter = BlockDiffusionDrafter.from_pretrained(best)
        assert drafter.config.architecture == "dflash" and drafter.config.mask_token_id is not None
        drafter.export(tmp_path / f"tf-{best.parent.name}", "transformers")
        spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5))
        assert spec.generate(prompt, max_new_tokens=20).token_ids[0].tolist() == ref.tolist()


@pytest.mark.slow
def test_a_position_cap_trains_on_the_kept_sequences_only(target, tmp_path):
    """max_positions leaves rows out of a shard; the caches then hold only the kept rows."""
    from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion

    fake_distill(tmp_path / "data", target)
    cfg = TrainConfig(
        block_size=6,
        num_layers=1,
        num_target_layers=2,
        draft_vocab_size=40,
        anchors_per_seq=4,
        batch_size=4,
        max_steps=4,
        warmup_steps=1,
        eval_every=4,
        checkpoint_every=4,
        eval_sequences=4,
        heldout_mod=6,
        max_positions=300,
    )
    train_block_diffusion(target, tmp_path / "data", tmp_path / "run", cfg, feature_root=tmp_path / "features")
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["train_sequences"] < 20 and summary["steps"] == 4
