"""The position-indexed KV cache (verify/kv_cache.py): ragged rows through a real HF model equal each
row run alone, nothing is committed before advance(), tree paths move within their row, reorder
and growth keep every row's content."""

from __future__ import annotations

import torch

from dllm_spec.verify.kv_cache import StaticKVCache
from tests.conftest import tiny_llama


def _forward(model, cache, feed, offsets=None):
    n = feed.shape[1]
    cache.plan(n)
    mask = cache.attention_mask(torch.ones((n, n), dtype=torch.bool).tril(), model.dtype)
    pos = cache.positions(torch.arange(n) if offsets is None else offsets)
    return model(input_ids=feed, cache=cache, use_cache=True, attention_mask=mask, position_ids=pos).logits


@torch.inference_mode()
def test_ragged_rows_give_what_each_row_alone_gives():
    model = tiny_llama(0)
    a, b = [0, 5, 9, 14, 5, 9], [0, 3, 7]
    cache = StaticKVCache.for_model(model, max_batch=2, capacity=8)
    rows = cache.add_rows(2)
    # prefill both rows in one right-padded forward over only those rows
    cache.plan(len(a), rows)
    feed = torch.tensor([a, b + [1] * (len(a) - len(b))])
    mask = cache.attention_mask(torch.ones((len(a), len(a)), dtype=torch.bool).tril(), model.dtype)
    model(
        input_ids=feed,
        cache=cache,
        use_cache=True,
        attention_mask=mask,
        position_ids=cache.positions(torch.arange(len(a))),
    )
    cache.advance([len(a), len(b)], rows)
    assert cache.lengths[:2] == [6, 3]
    step = _forward(model, cache, torch.tensor([[11, 12], [13, 14]]))  # two new tokens per row at per-row positions
    for r, (prompt, new) in enumerate([(a, [11, 12]), (b, [13, 14])]):
        alone = model(torch.tensor([prompt + new])).logits[0, -2:]
        torch.testing.assert_close(step[r], alone, rtol=1e-5, atol=1e-5)
    cache.advance([1, 2])  # row 0 keeps one of its two tokens, row 1 both
    assert cache.lengths[:2] == [7, 5]
    nxt = _forward(model, cache, torch.tensor([[20], [21]]))  # row 0's rejected token is overwritten, not seen
    torch.testing.assert_close(nxt[0, 0], model(torch.tensor([a + [11, 20]])).logits[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt[1, 0], model(torch.tensor([b + [13, 14, 21]])).logits[0, -1], rtol=1e-5, atol=1e-5)


def test_keep_paths_reorder_and_growth_move_the_right_slots():
    cache = StaticKVCache(
        num_layers=1, num_kv_heads=1, head_dim=1, max_batch=3, dtype=torch.float32, device="cpu", capacity=4
    )
    cache.add_rows(3)
    cache.plan(4)
    values = torch.arange(12, dtype=torch.float32).view(3, 1, 4, 1)  # row r, slot i holds 4r + i
    cache.update(values, values, 0)
    cache.keep_paths(torch.tensor([[2, 0], [0, 1], [1, 1]]))  # after the root (slot 0): row 0 keeps nodes 2 then 0
    cache.advance([3, 3, 2])
    assert cache.keys[0][0, 0, :3, 0].tolist() == [0, 3, 1]
    assert cache.keys[0][1, 0, :3, 0].tolist() == [4, 5, 6]
    assert cache.keys[0][2, 0, :2, 0].tolist() == [8, 10]
    cache.reorder([2, 0])  # row 1 finished: rows 2 and 0 remain, in that order
    assert cache.batch == 2 and cache.lengths[:2] == [2, 3]
    assert cache.keys[0][0, 0, :2, 0].tolist() == [8, 10] and cache.keys[0][1, 0, :3, 0].tolist() == [0, 3, 1]
    cache.plan(200)  # past the capacity: grown, content kept
    assert cache.capacity >= 203 and cache.keys[0][1, 0, :3, 0].tolist() == [0, 3, 1]
    cache.advance([0, 0])
    cache.start_rows([5])  # a slot past max_batch: rows are allocated
    assert cache.max_batch == 6 and cache.batch == 6 and cache.lengths[5] == 0


def test_the_mask_lets_each_row_see_its_context_and_its_block_only():
    cache = StaticKVCache(num_layers=1, num_kv_heads=1, head_dim=1, max_batch=2, dtype=torch.float32, device="cpu")
    cache.add_rows(2)
    cache.advance([3, 1])
    cache.plan(2)
    allowed = cache.attention_mask(torch.ones((2, 2), dtype=torch.bool).tril(), torch.float32) == 0  # (2, 1, 2, 5)
    assert allowed[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert allowed[1, 0].tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    assert cache.positions(torch.arange(2)).tolist() == [[3, 4], [1, 2]]


def test_a_cache_grown_inside_inference_mode_can_still_drop_rows_outside_it():
    cache = StaticKVCache(
        num_layers=1, num_kv_heads=1, head_dim=1, max_batch=2, dtype=torch.float32, device="cpu", capacity=4
    )
    cache.add_rows(2)
    with torch.inference_mode():  # the verifier's forwards run in inference mode and may grow the cache
        cache.plan(100)
        cache.update(torch.ones(2, 1, 100, 1), torch.ones(2, 1, 100, 1), 0)
        cache.advance([100, 50])
    cache.reorder([1])  # the loop drops finished rows outside inference mode
    assert cache.batch == 1 and cache.lengths[0] == 50
