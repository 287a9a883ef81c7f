"""Acceptance rules: exact checks on hand-built tensors, and statistical checks that speculative
sampling and block verification reproduce the target distribution."""

from __future__ import annotations

import itertools

import pytest
import torch

from dllm_spec.verify.acceptance import (
    block_verification_accept,
    greedy_accept,
    match_accept,
    speculative_sampling_accept,
)
from dllm_spec.verify.sampling import SamplingParams, probs_from_logits, warp_logits


def test_greedy_accepts_longest_matching_prefix_and_adds_target_token():
    logits = torch.full((1, 4, 5), -1.0)
    for pos, tok in enumerate([2, 3, 0, 4]):
        logits[0, pos, tok] = 1.0
    res = greedy_accept(torch.tensor([[2, 3, 1]]), logits)
    assert res.num_accepted.tolist() == [2] and res.next_token.tolist() == [0]
    res = greedy_accept(torch.tensor([[2, 3, 0]]), logits)
    assert res.num_accepted.tolist() == [3] and res.next_token.tolist() == [4]  # bonus
    res = greedy_accept(torch.tensor([[1, 3, 0]]), logits)
    assert res.num_accepted.tolist() == [0] and res.next_token.tolist() == [2]


def test_greedy_accept_handles_empty_draft():
    logits = torch.tensor([[[0.0, 3.0, 1.0]]])
    res = greedy_accept(torch.zeros((1, 0), dtype=torch.long), logits)
    assert res.num_accepted.tolist() == [0] and res.next_token.tolist() == [1]


def test_speculative_sampling_accepts_everything_when_q_equals_p():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(64, 4, 7, generator=g), -1)
    draft = torch.multinomial(p[:, :3].reshape(-1, 7), 1, generator=g).reshape(64, 3)
    res = speculative_sampling_accept(draft, p[:, :3], p, g)
    assert torch.equal(res.num_accepted, torch.full((64,), 3))


def test_speculative_sampling_rejects_tokens_the_target_cannot_produce():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[1.0, 0.0, 0.0]]])
    res = speculative_sampling_accept(torch.tensor([[0]]), q, p, g)
    assert res.num_accepted.tolist() == [0] and res.next_token.tolist() == [1]


def test_top_k_and_top_p_filter_consistently():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=3))
    assert (probs[0, 3:] == 0).all() and torch.isclose(probs.sum(), torch.tensor(1.0))
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert probs[0, 0] == 1.0  # the top token alone holds 66% > 0.5
    assert torch.isinf(warp_logits(logits, SamplingParams(temperature=2.0, top_k=1))[0, 1:]).all()


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_sampling_params_reject_invalid_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


# ---- statistical losslessness --------------------------------------------------------------------
V, K, L, N = 4, 3, 3, 40_000


def _markov(seed: int, sharp: float) -> torch.Tensor:
    """Transition logits (V, V): row = previous token."""
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * sharp


def _simulate(rule: str, params: SamplingParams, seed: int = 0) -> torch.Tensor:
    """Run N independent speculative decodes of L tokens with Markov target p and drafter q.

    Returns the empirical distribution over the V**L sequences."""
    g = torch.Generator().manual_seed(seed)
    p_table = probs_from_logits(_markov(1, 1.5), params)  # (V, V)
    q_table = probs_from_logits(_markov(2, 1.0), params)
    out = torch.full((N, L + K + 1), -1, dtype=torch.long)
    length = torch.zeros(N, dtype=torch.long)
    last = torch.zeros(N, dtype=torch.long)  # start token 0
    rows = torch.arange(N)
    while (length < L).any():
        drafts, qs, prev = [], [], last
        for _ in range(K):
            q = q_table[prev]  # (N, V)
            tok = torch.multinomial(q, 1, generator=g).squeeze(-1)
            drafts.append(tok)
            qs.append(q)
            prev = tok
        draft = torch.stack(drafts, 1)  # (N, K)
        q = torch.stack(qs, 1)  # (N, K, V)
        p = p_table[torch.cat([last[:, None], draft], 1)]  # (N, K+1, V)
        if rule == "token":
            res = speculative_sampling_accept(draft, q, p, g)
        elif rule == "block":
            res = block_verification_accept(draft, q, p, g)
        elif rule == "match":
            res = match_accept(draft, p, g)
        elif rule == "always-accept":  # a wrong rule: the test must catch it
            res = type(speculative_sampling_accept(draft, q, p, g))(
                torch.full((N,), K), torch.multinomial(p[:, K], 1, generator=g).squeeze(-1)
            )
        new = torch.cat([draft, torch.zeros(N, 1, dtype=torch.long)], 1)
        new[rows, res.num_accepted] = res.next_token
        for j in range(K + 1):
            write = (j <= res.num_accepted) & (length < L)
            out[rows[write], length[write]] = new[write, j]
            length = length + write.long()
        last = out[rows, (length - 1).clamp_min(0)]
    codes = (out[:, :L] * torch.tensor([V ** (L - 1 - i) for i in range(L)])).sum(1)
    return torch.bincount(codes, minlength=V**L).float() / N


def _exact(params: SamplingParams) -> torch.Tensor:
    p_table = probs_from_logits(_markov(1, 1.5), params)
    probs = torch.zeros(V**L)
    for seq in itertools.product(range(V), repeat=L):
        prob, prev = 1.0, 0
        for t in seq:
            prob *= float(p_table[prev, t])
            prev = t
        probs[sum(t * V ** (L - 1 - i) for i, t in enumerate(seq))] = prob
    return probs


SETTINGS = [SamplingParams(1.0), SamplingParams(0.7, top_k=3, top_p=0.9)]


@pytest.mark.parametrize("rule", ["token", "block", "match"])
@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.7-k3-p0.9"])
def test_rule_reproduces_target_distribution(rule, params):
    tv = 0.5 * (_simulate(rule, params) - _exact(params)).abs().sum()
    assert tv < 0.025, f"total variation {tv:.4f} between {rule} speculative output and the target"


def test_statistical_check_detects_a_lossy_rule():
    tv = 0.5 * (_simulate("always-accept", SETTINGS[0]) - _exact(SETTINGS[0])).abs().sum()
    assert tv > 0.1


def test_block_verification_accepts_at_least_as_many_tokens_as_token_level():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(20_000, K + 1, V, generator=g), -1)
    q = torch.softmax(torch.randn(20_000, K, V, generator=g), -1)
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(-1, K)
    token = speculative_sampling_accept(draft, q, p, g).num_accepted.float().mean()
    block = block_verification_accept(draft, q, p, g).num_accepted.float().mean()
    assert block >= token - 0.02
