"""Keyed Gumbel-max sampling (verify/keyed.py): exact draws (head and tail), a pure function of
(seed, position, distribution), noise keyed by token id (a draft vocabulary sees the same noise),
and the drafter's guesses coincide with the sample when its distribution equals the target's."""

from __future__ import annotations

import torch

from dllm_spec.verify.keyed import NoiseKeys, keyed_candidates, keyed_gumbel, keyed_sample, keyed_uniform
from dllm_spec.verify.sampling import SamplingParams, warp_logits


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return float(0.5 * (counts / counts.sum() - p).abs().sum())


def test_keyed_samples_are_exact_draws_with_the_tail_in_play():
    """20 tokens, a head of 4: the tail (16 tokens, ~half the mass) often wins and is drawn by the keyed
    inverse CDF. 20,000 positions: null TV ~0.01, a biased rule (head only, or a wrong tail) >> 0.03."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, generator=gen) * 0.7
    for params in (SamplingParams(1.0), SamplingParams(0.7, top_k=12), SamplingParams(1.3, top_p=0.8)):
        warped = warp_logits(logits[None], params)[0]
        n = 20_000
        draws = keyed_sample(warped.expand(n, -1).contiguous(), torch.full((n,), 5), torch.arange(n), head=4)
        p = warped.softmax(-1)
        assert _tv(torch.bincount(draws, minlength=20).float(), p) < 0.03, params
        assert bool((p[draws] > 0).all())  # never a filtered token


def test_a_sample_is_a_function_of_seed_position_and_distribution_only():
    logits = torch.randn(50, 300)
    seeds, positions = torch.arange(50) * 7 + 2**40, torch.arange(50) + 100
    a = keyed_sample(logits, seeds, positions, head=8)
    assert torch.equal(a, keyed_sample(logits.clone(), seeds.clone(), positions.clone(), head=8))
    # row by row (another batch) gives the same tokens
    assert torch.equal(
        a,
        torch.cat([keyed_sample(logits[i : i + 1], seeds[i : i + 1], positions[i : i + 1], head=8) for i in range(50)]),
    )
    # another seed, or the next position, gives other noise
    assert not torch.equal(
        keyed_gumbel(seeds, positions, torch.arange(300).expand(50, -1)),
        keyed_gumbel(seeds + 1, positions, torch.arange(300).expand(50, -1)),
    )
    assert not torch.equal(
        keyed_gumbel(seeds, positions, torch.arange(300).expand(50, -1)),
        keyed_gumbel(seeds, positions + 1, torch.arange(300).expand(50, -1)),
    )


def test_keyed_uniforms_are_uniform_and_keyed_by_token_id():
    u = keyed_uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), torch.arange(4096).expand(64, -1))
    assert 0 < float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u, 16, 0, 1) / u.numel()
    assert float((hist - 1 / 16).abs().max()) < 0.002
    ids = torch.tensor([[5, 4000, 17]] * 64)
    assert torch.equal(keyed_uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), ids), u[:, [5, 4000, 17]])


def test_a_drafter_with_the_targets_distribution_guesses_every_sample():
    logits = torch.randn(200, 1000) * 4  # peaked, as a language model is: the head holds most of the mass
    seeds, positions = torch.full((200,), 9), torch.arange(200)
    sample = keyed_sample(logits, seeds, positions)
    ids, probs = keyed_candidates(logits, seeds, positions, width=3)
    in_head = logits.gather(-1, sample[:, None]).squeeze(-1) >= logits.topk(64, -1).values[:, -1]
    assert torch.equal(ids[in_head, 0], sample[in_head]) and float(in_head.float().mean()) > 0.9
    assert bool((probs[:, :-1] >= probs[:, 1:]).all())
    # a draft vocabulary (a subset of target ids) perturbed with the same, target-keyed noise
    vocab = torch.arange(0, 1000, 2)
    sub, _ = keyed_candidates(logits[:, vocab], seeds, positions, width=1, id_map=vocab)
    even = (sample % 2 == 0) & in_head
    assert torch.equal(vocab[sub[even, 0]], sample[even])


def test_noise_keys_flatten_rows_and_offsets():
    keys = NoiseKeys(torch.tensor([3, 8]), torch.tensor([10, 20]))
    seeds, positions = keys.at(torch.arange(3))
    assert seeds.tolist() == [3, 3, 3, 8, 8, 8] and positions.tolist() == [10, 11, 12, 20, 21, 22]
    seeds, positions = keys.at(torch.tensor([[0, 1], [2, 2]]))
    assert positions.tolist() == [10, 11, 22, 22] and keys.row(1).seeds.tolist() == [8]
