"""Block-diffusion drafter: the drafter contract, greedy exactness and sampling losslessness through
the loop, save/load round trip, errors for a drafter trained for another target, the unmasking
schedulers, and a training smoke test."""

from __future__ import annotations

import gzip
import json
import random
import shutil

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import CostAwarePolicy, FixedLength
from drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, BlockDiffusionModel
from drafters.schedulers import ConfidenceUnmaskingScheduler, LeftToRightUnmaskingScheduler
from tests.conftest import VOCAB, begin, commit, prefill, propose, sampling_target, tiny_llama, two_token_total_variation
from verify.sampling import SamplingParams


def make_drafter(target, steps=1, scheduler=None, draft_vocab=0, seed=0, tree_width=1):
    torch.manual_seed(seed)
    cfg = BlockDiffusionConfig.for_target(target, num_layers=1, num_target_layers=2, block_size=6,
                                          draft_vocab_size=draft_vocab, num_inference_steps=steps)
    model = BlockDiffusionModel(cfg)
    if draft_vocab:
        model.draft_vocab.copy_(torch.arange(0, 2 * draft_vocab, 2))
    return BlockDiffusionDrafter(model, scheduler, num_inference_steps=steps, tree_width=tree_width)


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
        from verify.verifier import Verifier

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
    a = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5)).generate(torch.tensor([[0, 4, 8]]), max_new_tokens=12, temperature=1.0, seed=3)
    b = DiffusionSpeculator(target, None, loaded, policy=FixedLength(5)).generate(torch.tensor([[0, 4, 8]]), max_new_tokens=12, temperature=1.0, seed=3)
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


@pytest.mark.parametrize("steps,scheduler", [(1, None), (3, LeftToRightUnmaskingScheduler(num_inference_steps=3)),
                                             (3, ConfidenceUnmaskingScheduler(num_inference_steps=3))])
def test_sampling_with_block_diffusion_keeps_target_distribution(steps, scheduler):
    target = sampling_target()
    spec = DiffusionSpeculator(target, None, make_drafter(target, steps, scheduler=scheduler), policy=FixedLength(3))
    tv = two_token_total_variation(spec, target, draws=1500)
    assert tv < 0.1, f"TV {tv:.3f}"


def test_scheduler_commits_every_position_within_its_steps():
    for cls in (ConfidenceUnmaskingScheduler, LeftToRightUnmaskingScheduler):
        s = cls(num_inference_steps=3)
        s.set_timesteps(3, 7)
        assert s.counts == [3, 2, 2]
        tokens = torch.zeros((1, 7), dtype=torch.long)
        masked = torch.ones((1, 7), dtype=torch.bool)
        logits = torch.randn(1, 7, 11, generator=torch.Generator().manual_seed(0))
        order = []
        for step in range(3):
            out = s.step(logits, step, tokens, masked, SamplingParams())
            order.append(out.committed[0].nonzero().flatten().tolist())
            tokens, masked = out.tokens, out.masked
        assert not masked.any() and torch.equal(tokens, logits.argmax(-1))
        if cls is LeftToRightUnmaskingScheduler:
            assert order == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="num_inference_steps"):
        ConfidenceUnmaskingScheduler(num_inference_steps=0)


def _fake_distill(path, target, n=24, seed=0):
    """Greedy continuations of the tiny target, written as a distillation shard."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "shard-00000.jsonl.gz", "wt") as fh:
        for i in range(n):
            prompt = [0] + [rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 8))]
            out = target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=1)[0, len(prompt):].tolist()
            fh.write(json.dumps({"prompt_id": f"p{i}", "category": "x", "variant": 0, "temperature": 0.0,
                                 "prompt_ids": prompt, "response_ids": out}) + "\n")


@pytest.mark.slow
def test_training_lowers_the_loss_and_resumes(target, tmp_path):
    from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion

    _fake_distill(tmp_path / "data", target)
    cfg = TrainConfig(block_size=6, num_layers=1, num_target_layers=2, draft_vocab_size=40, anchors_per_seq=6, batch_size=4,
                      max_steps=40, warmup_steps=5, eval_every=20, checkpoint_every=10, eval_sequences=8, heldout_mod=6, lr=3e-3)
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
    assert json.loads((tmp_path / "warm" / "eval.json").read_text())["final_heldout_tau"] >= warm[0]["heldout_tau"] - 1e-9


# ---- standalone masked-diffusion drafter ------------------------------------------------------------
def tiny_mdlm(vocab: int = VOCAB, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=512)
    return BertForMaskedLM(cfg).eval()


@pytest.mark.parametrize("steps,tree", [(1, 1), (3, 1), (2, 3)])
def test_greedy_output_equals_plain_greedy_with_masked_diffusion(target, steps, tree):
    from drafters import MaskedDiffusionDrafter

    drafter = MaskedDiffusionDrafter(tiny_mdlm(), mask_token_id=VOCAB - 1, block_size=5, num_inference_steps=steps, tree_width=tree)
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5 if tree == 1 else 10))
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    ref = target.generate(prompt, max_new_tokens=25, do_sample=False, pad_token_id=1)[0, 8:]
    assert spec.generate(prompt, max_new_tokens=25).token_ids[0].tolist() == ref.tolist()
    proposal = propose(drafter, prompt, 5, SamplingParams(1.0), torch.Generator().manual_seed(0))
    assert (proposal.tokens != VOCAB - 1).all()  # never proposes the mask id
    assert proposal.is_tree == (tree > 1)


def test_build_drafter_loads_a_checkpoint_directory_with_steps(target, tmp_path):
    from drafters import build_drafter

    make_drafter(target, 1).save_pretrained(tmp_path / "ckpt")
    drafter = build_drafter(f"{tmp_path / 'ckpt'}:3", target)
    assert isinstance(drafter, BlockDiffusionDrafter) and drafter.steps == 3
    assert build_drafter(str(tmp_path / "ckpt"), target).steps == 1
    tree = build_drafter(f"{tmp_path / 'ckpt'}:2:tree=3", target)
    assert tree.steps == 2 and tree.tree_width == 3 and tree.name == "block-diffusion-s2-tree3"
    assert build_drafter(f"prompt-lookup+{tmp_path / 'ckpt'}:tree=3", target).tree_width == 3
    with pytest.raises(ValueError, match="tree=M"):
        build_drafter(f"{tmp_path / 'ckpt'}:tree=0", target)
    with pytest.raises(ValueError, match="unknown drafter"):
        build_drafter("no-such-drafter", target)


def test_feature_cache_matches_the_target_and_is_recomputed_when_data_change(target, tmp_path):
    from dllm_spec.training.features import FeatureStore, compute_features

    rows = [[0, 5, 9, 14, 5], [0, 7, 7, 2, 3, 4, 8, 11]]
    store = FeatureStore(tmp_path, target, [1, 2])
    store.build({"shard-a": rows}, show_progress=False)
    ref = compute_features(target, torch.tensor([rows[1]]), torch.ones(1, len(rows[1]), dtype=torch.long), [1, 2])[0]
    torch.testing.assert_close(store.get("shard-a", 1, 8), ref, atol=2e-3, rtol=2e-3)  # float16 storage
    padded = store.batch([("shard-a", 0), ("shard-a", 1)], [5, 8])
    assert padded.shape == (2, 8, 2 * target.config.hidden_size) and padded[0, 5:].abs().sum() == 0
    with pytest.raises(ValueError, match="cached positions"):
        store.get("shard-a", 0, 6)
    before = (tmp_path / "shard-a.f16").stat().st_mtime_ns
    store.build({"shard-a": rows}, show_progress=False)  # unchanged: reused
    assert (tmp_path / "shard-a.f16").stat().st_mtime_ns == before
    changed = [rows[0], rows[1][:-1] + [12]]
    fresh = FeatureStore(tmp_path, target, [1, 2])
    fresh.build({"shard-a": changed}, show_progress=False)  # same shard name, other ids: recomputed
    ref2 = compute_features(target, torch.tensor([changed[1]]), torch.ones(1, 8, dtype=torch.long), [1, 2])[0]
    torch.testing.assert_close(fresh.get("shard-a", 1, 8), ref2, atol=2e-3, rtol=2e-3)


def test_training_forward_gives_the_drafter_what_drafting_gives_it(target):
    """The training forward (many anchors at once under a block-sparse mask, features from the
    cache layout) matches drafting: for each anchor, propose()'s one-step greedy drafts and
    confidences equal those read off the training states (catches off-by-one context, position
    or last-context-injection errors)."""
    from dllm_spec.training.block_diffusion import BlockBatch, Sequence, TrainConfig, block_states
    from dllm_spec.training.features import compute_features

    drafter = make_drafter(target, 1)
    with torch.no_grad():
        drafter.model.last_context_proj.weight.normal_(0, 0.5)  # make the injected state matter
    DiffusionSpeculator(target, None, drafter)  # binds
    ids = [0, 5, 9, 14, 5, 9, 22, 7, 3, 11, 30, 2, 17, 4]
    anchors = [3, 6, 8]
    batch = BlockBatch([Sequence(ids, prompt_len=3, greedy=True)], TrainConfig(block_size=6, anchors_per_seq=3),
                       torch.arange(VOCAB), random.Random(0), noised=False, anchors=[anchors])
    feats = compute_features(target, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), list(drafter.target_layer_ids))
    with torch.no_grad():
        logits = block_states(drafter.model, batch, feats, target.get_input_embeddings(), 6) @ target.lm_head.weight.T  # (1, A, 5, V)
    for k, a in enumerate(anchors):
        begin(drafter, torch.tensor([ids[: a + 1]]), feats[:, :a])  # as after the prefill: features of all but the last token
        proposal = propose(drafter, torch.tensor([ids[: a + 1]]), 5, SamplingParams(), None)
        assert proposal.tokens[0].tolist() == logits[0, k].argmax(-1).tolist()
        torch.testing.assert_close(proposal.confidence[0], logits[0, k].softmax(-1).amax(-1), atol=1e-4, rtol=1e-4)


def test_teacher_cache_is_the_targets_next_token_distribution_aligned_with_block_labels(target, tmp_path):
    """On greedy continuations the cached teacher's top-1 at every response label is the label
    itself (the alignment distillation relies on), and the cached log-probs are the target's."""
    from dllm_spec.training.block_diffusion import BlockBatch, Sequence, TrainConfig, block_teacher
    from dllm_spec.training.features import TeacherStore

    prompt = [0, 5, 9, 14]
    ids = target.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=1)[0].tolist()
    store = TeacherStore(tmp_path, target, k=4)
    store.build({"s": [ids]}, show_progress=False)
    logp = torch.log_softmax(target(torch.tensor([ids])).logits[0].float(), -1)
    top = logp.topk(4, -1)
    cached = store.get("s", 0, len(ids))
    assert cached[:, :4].long().tolist() == top.indices.tolist()
    torch.testing.assert_close(cached[:, 4:], top.values, atol=1e-5, rtol=1e-5)
    seq = Sequence(ids, prompt_len=len(prompt), greedy=True, shard="s", row=0)
    batch = BlockBatch([seq], TrainConfig(block_size=6, anchors_per_seq=4), torch.arange(VOCAB), random.Random(0), noised=False)
    teacher = block_teacher(store, [seq], batch, "cpu")  # (1, A, 5, 8)
    valid = batch.label_valid
    assert valid.any()
    assert torch.equal(teacher[..., 0].long()[valid], batch.body_tokens[valid])


def test_feature_and_teacher_caches_fill_from_one_target_forward(target, tmp_path):
    """build_stores runs the target once per batch for both caches, and each cache equals the one
    built on its own."""
    from dllm_spec.training.features import FeatureStore, TeacherStore, build_stores

    rows = {"a": [[0, 5, 9, 14, 5], [0, 7, 7, 2, 3, 4, 8, 11]], "b": [[3, 1, 4, 1, 5, 9, 2]]}
    calls = []
    handle = target.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        feats, teach = FeatureStore(tmp_path / "f", target, [1, 2]), TeacherStore(tmp_path / "t", target, k=3)
        build_stores([feats, teach], rows, batch_size=8, show_progress=False)
        assert len(calls) == 2  # one batch per shard, shared by both stores
        build_stores([feats, teach], rows, show_progress=False)
        assert len(calls) == 2  # all cached: nothing recomputed
    finally:
        handle.remove()
    alone_f, alone_t = FeatureStore(tmp_path / "f2", target, [1, 2]), TeacherStore(tmp_path / "t2", target, k=3)
    alone_f.build(rows, show_progress=False)
    alone_t.build(rows, show_progress=False)
    for shard, seqs in rows.items():
        for r, ids in enumerate(seqs):
            assert torch.equal(feats.get(shard, r, len(ids)), alone_f.get(shard, r, len(ids)))
            assert torch.equal(teach.get(shard, r, len(ids)), alone_t.get(shard, r, len(ids)))


def test_distillation_to_a_one_hot_teacher_is_plain_cross_entropy(target):
    from dllm_spec.training.block_diffusion import BlockBatch, Sequence, TrainConfig, weighted_loss

    ids = [0, 5, 9, 14, 5, 9, 22, 7, 3, 11, 30, 2, 17, 4]
    batch = BlockBatch([Sequence(ids, prompt_len=3, greedy=True)], TrainConfig(block_size=6, anchors_per_seq=3),
                       torch.arange(VOCAB), random.Random(0), noised=False)
    states = torch.randn(1, 3, 5, 8)
    head = torch.randn(VOCAB, 8)
    k = 3
    one_hot = torch.cat([batch.body_tokens.unsqueeze(-1).float(), torch.zeros(1, 3, 5, k - 1),  # ids: label, then 0s
                         torch.zeros(1, 3, 5, 1), torch.full((1, 3, 5, k - 1), -1e9)], dim=-1)  # log-probs: 0, -inf
    plain = weighted_loss(states, batch, head, 7.0)
    torch.testing.assert_close(weighted_loss(states, batch, head, 7.0, one_hot, 1.0, torch.arange(VOCAB)), plain)
    soft = one_hot.clone()
    soft[..., k + 1] = 0.0  # half the mass on token 0: the loss changes
    assert not torch.allclose(weighted_loss(states, batch, head, 7.0, soft, 1.0, torch.arange(VOCAB)), plain)


def test_drafts_after_skipped_cycles_equal_drafts_of_a_fresh_drafter(target, small_drafter_model):
    """When the policy skips drafting, the drafter only sees commit() calls; its next proposal must
    be the one a freshly started drafter makes on the same committed sequence."""
    from dllm_spec.training.features import compute_features
    from drafters import AutoregressiveDrafter

    ids = [0, 5, 9, 14, 5, 9, 22, 7, 3, 11, 30, 2, 17, 4, 8, 19]
    for make in (lambda: make_drafter(target, 2), lambda: AutoregressiveDrafter(small_drafter_model, name="small-ar")):
        drafter, fresh = make(), make()
        DiffusionSpeculator(target, None, drafter)
        DiffusionSpeculator(target, None, fresh)
        layers = list(drafter.target_layer_ids)
        feats = compute_features(target, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), layers) if layers else None
        cut = lambda a, b: None if feats is None else feats[:, a:b]  # noqa: E731
        begin(drafter, torch.tensor([ids[:5]]), cut(0, 4))
        propose(drafter, torch.tensor([ids[:5]]), 4, SamplingParams(), None)
        prev = 5
        for end in (7, 8, 12):  # three committed cycles, no proposal in between; the target wrote positions prev-1 .. end-2
            commit(drafter, torch.tensor([ids[:end]]), cut(prev - 1, end - 1))
            prev = end
        begin(fresh, torch.tensor([ids[:12]]), cut(0, 11))
        got = propose(drafter, torch.tensor([ids[:12]]), 4, SamplingParams(), None)
        want = propose(fresh, torch.tensor([ids[:12]]), 4, SamplingParams(), None)
        assert got.tokens.tolist() == want.tokens.tolist()
        torch.testing.assert_close(got.confidence, want.confidence, atol=1e-5, rtol=1e-5)


def test_training_curve_reads_evaluations_and_shifts_warm_started_runs(tmp_path):
    from dllm_spec.training.curves import heldout_points, main

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 3.0, "tokens": 100}, {"step": 2, "loss": 2.5, "tokens": 200, "heldout_tau": 1.2},
        {"step": 3, "loss": 2.0, "tokens": 300, "heldout_tau": 1.3}]) + "\n")
    assert heldout_points(run / "train_log.jsonl") == [(200, 1.2), (300, 1.3)]
    main([f"a={run}", "--offset", "a=1e6", "--break-even", "2.2", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main([f"a={run}", "--offset", "b=5", "--out", str(tmp_path / "d.png")])


def test_resident_stores_equal_the_disk_caches(target, tmp_path):
    """ResidentStore (features computed once into memory, for GPU runs) serves the same arrays as
    the on-disk caches, padded with zeros, fills all stores from one target forward per batch, and
    rejects sequences it does not hold."""
    from dllm_spec.training.features import FeatureStore, ResidentStore, TeacherStore, build_stores

    rows = {"a": [[0, 5, 9, 14, 5], [0, 7, 7, 2, 3, 4, 8, 11]], "b": [[3, 1, 4, 1, 5, 9, 2]]}
    feats, teach = FeatureStore(tmp_path / "f", target, [1, 2]), TeacherStore(tmp_path / "t", target, k=3)
    build_stores([feats, teach], rows, show_progress=False)
    keys, lengths = [("b", 0), ("a", 1), ("a", 0)], [7, 8, 4]
    calls = []
    handle = target.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        residents = ResidentStore.fill([feats, teach], rows, device="cpu", batch_size=2, show_progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # shard a: one batch of 2, shard b: one of 1; shared by both stores
    for disk, resident in zip((feats, teach), residents):
        got = resident.batch(keys, lengths)
        torch.testing.assert_close(got, disk.batch(keys, lengths), atol=0, rtol=0)
        assert got.shape == (3, 8, disk.width) and not got[2, 4:].any()
    with pytest.raises(KeyError, match="c:0"):
        resident.batch([("c", 0)], [3])
    with pytest.raises(ValueError, match="positions"):
        resident.batch([("a", 0)], [6])


@pytest.mark.slow
def test_training_with_resident_features_follows_the_disk_cache_run(target, tmp_path):
    """Same data, config and seed: resident features (and teacher) give the disk-cache run's losses
    step for step, and write nothing to the disk cache."""
    from dllm_spec.training.block_diffusion import TrainConfig, train_block_diffusion

    _fake_distill(tmp_path / "data", target)
    cfg = TrainConfig(block_size=6, num_layers=1, num_target_layers=2, draft_vocab_size=40, anchors_per_seq=6, batch_size=4,
                      max_steps=12, warmup_steps=3, eval_every=6, checkpoint_every=6, eval_sequences=8, heldout_mod=6,
                      lr=3e-3, distill_weight=0.5, teacher_top_k=4)
    logs = {}
    for name, resident in (("disk", False), ("resident", True)):
        train_block_diffusion(target, tmp_path / "data", tmp_path / name, cfg, feature_root=tmp_path / f"cache-{name}",
                              resident_features=resident)
        logs[name] = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert not (tmp_path / "cache-resident").exists()
    torch.testing.assert_close([r["loss"] for r in logs["resident"]], [r["loss"] for r in logs["disk"]])
    assert [r.get("heldout_tau") for r in logs["resident"]] == [r.get("heldout_tau") for r in logs["disk"]]


def test_time_budget_paces_the_learning_rate_schedule():
    """With a time budget the cosine decay follows whichever of steps or time is further along."""
    from dllm_spec.training.common import warmup_cosine

    spent = {"fraction": 0.0}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, max_steps=1000, time_fraction=lambda: spent["fraction"])
    for _ in range(3):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] > 0.99  # early in steps and in time: the peak
    spent["fraction"] = 1.0
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.05)  # the budget is spent: the floor


# ---- prompt lookup first, block diffusion as fallback ----------------------------------------------
def test_fallback_drafter_uses_the_free_drafter_when_it_matches_and_keeps_greedy_output(target):
    """Prompt lookup's proposal when it matches an n-gram of >= 2 tokens, the block-diffusion
    drafter's otherwise (and then exactly what a block-diffusion drafter alone proposes, although
    it sat out earlier cycles); greedy output equals plain greedy under both policies."""
    from dllm_spec.training.features import compute_features
    from drafters import FallbackDrafter, NullDrafter, PromptLookupDrafter, build_drafter

    lone, hybrid = make_drafter(target, 1), FallbackDrafter(PromptLookupDrafter(), make_drafter(target, 1))
    assert hybrid.name == f"prompt-lookup+{lone.name}" and hybrid.target_layer_ids == lone.target_layer_ids
    DiffusionSpeculator(target, None, hybrid)  # binds both
    DiffusionSpeculator(target, None, lone)
    ids = [0, 5, 9, 14, 5, 9, 31]  # "5 9" repeats: a 2-gram match after 6 tokens; nothing matches after 31
    feats = compute_features(target, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), list(lone.target_layer_ids))
    for d in (hybrid, lone):
        begin(d, torch.tensor([ids[:6]]), feats[:, :5])
    got = propose(hybrid, torch.tensor([ids[:6]]), 4, SamplingParams(), None)
    assert hybrid.last_source == "prompt-lookup" and got.tokens.tolist() == [[14, 5, 9]] and got.q is None
    for d in (hybrid, lone):
        commit(d, torch.tensor([ids]), feats[:, 5:6])  # the target wrote position 5
    got = propose(hybrid, torch.tensor([ids]), 4, SamplingParams(), None)
    want = propose(lone, torch.tensor([ids]), 4, SamplingParams(), None)
    assert hybrid.last_source == lone.name and got.tokens.tolist() == want.tokens.tolist() and got.source == lone.name
    asked = []
    hybrid.attach_gate(lambda source: asked.append(source) or False)  # the policy says the fallback does not pay
    got = propose(hybrid, torch.tensor([ids]), 4, SamplingParams(), None)
    assert asked == [lone.name] and hybrid.last_source == "prompt-lookup" and got.length == 0
    for policy in (FixedLength(5), CostAwarePolicy(max_k=5)):
        spec = DiffusionSpeculator(target, None, FallbackDrafter(PromptLookupDrafter(), make_drafter(target, 1)), policy=policy)
        prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
        ref = target.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=1)[0, 8:]
        assert spec.generate(prompt, max_new_tokens=30).token_ids[0].tolist() == ref.tolist()
    built = build_drafter("prompt-lookup+none", target)
    assert isinstance(built, FallbackDrafter) and isinstance(built.fallback, NullDrafter)
    with pytest.raises(ValueError, match="put it second"):
        FallbackDrafter(make_drafter(target, 1), PromptLookupDrafter())


def test_sampling_with_prompt_lookup_then_block_diffusion_keeps_target_distribution():
    """Proposals alternate between prompt lookup (no q: match acceptance) and block diffusion (its
    q) within one sequence; the sampled tokens still follow the target's joint distribution."""
    from drafters import FallbackDrafter, PromptLookupDrafter

    target = sampling_target()
    hybrid = FallbackDrafter(PromptLookupDrafter(), make_drafter(target, 1), min_confidence=0.0)
    spec = DiffusionSpeculator(target, None, hybrid, policy=FixedLength(3))
    tv = two_token_total_variation(spec, target, draws=1500, prompt=(0, 2, 3, 2))  # "2" recurs: lookup proposes first
    assert tv < 0.1, f"TV {tv:.3f}"


def test_capping_positions_keeps_greedy_sequences_first_and_stays_under_the_cap():
    from dllm_spec.training.block_diffusion import Sequence, TrainConfig, cap_positions

    seqs = [Sequence(list(range(10 + i)), 2, greedy=i % 2 == 0, row=i) for i in range(20)]
    greedy_total = sum(len(s.ids) for s in seqs if s.greedy)
    kept = cap_positions(seqs, greedy_total + 25, seed=0)
    assert sum(len(s.ids) for s in kept) <= greedy_total + 25
    assert {s.row for s in kept if s.greedy} == {s.row for s in seqs if s.greedy}
    assert 0 < sum(not s.greedy for s in kept) < 10
    assert cap_positions(seqs, 0, seed=0) == seqs
    with pytest.raises(ValueError, match="max_positions"):
        TrainConfig(max_positions=-1)
