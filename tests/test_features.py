"""Target feature and teacher caches (dllm_spec/training/features.py)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import (
    VOCAB,
)


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


def test_teacher_cache_is_the_targets_next_token_distribution_aligned_with_block_labels(target, tmp_path):
    """On greedy continuations the cached teacher's top-1 at every response label is the label
    itself (the alignment distillation relies on), and the cached log-probs are the target's."""
    from dllm_spec.training.block_diffusion import TrainConfig
    from dllm_spec.training.block_examples import BlockBatch, block_teacher
    from dllm_spec.training.features import TeacherStore
    from dllm_spec.training.sequences import Sequence

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
    batch = BlockBatch(
        [seq], TrainConfig(block_size=6, anchors_per_seq=4), torch.arange(VOCAB), random.Random(0), noised=False
    )
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


def test_a_cache_built_in_one_precision_is_recomputed_for_the_other(target, tmp_path):
    """The index records the target pass's precision: a bf16-autocast cache is reused by a bf16 run
    and recomputed (not silently reused) by an fp32 one, whose arrays then equal a fresh fp32 build."""
    from dllm_spec.training.features import FeatureStore, build_stores

    rows = {"a": [[0, 5, 9, 14, 5], [3, 1, 4, 1, 5, 9, 2]]}
    store = FeatureStore(tmp_path / "f", target, [1, 2])
    calls = []
    handle = target.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        build_stores([store], rows, show_progress=False, bf16=True)
        build_stores([store], rows, show_progress=False, bf16=True)
        assert len(calls) == 1  # same precision: reused
        build_stores([store], rows, show_progress=False)
        assert len(calls) == 2  # fp32 run: recomputed
    finally:
        handle.remove()
    fresh = FeatureStore(tmp_path / "g", target, [1, 2])
    fresh.build(rows, show_progress=False)
    for r, ids in enumerate(rows["a"]):
        assert torch.equal(
            FeatureStore(tmp_path / "f", target, [1, 2]).get("a", r, len(ids)), fresh.get("a", r, len(ids))
        )


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
