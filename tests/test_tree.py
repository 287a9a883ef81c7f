"""Draft trees: the tree helpers, best-first tree building, greedy and lossless sampling acceptance
over a tree, the verifier's tree forward and cache compaction, and the loop end to end (greedy
output equal to plain greedy, sampled output following the target's distribution)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters.base import DraftProposal
from dllm_spec.drafters.composite import GraftDrafter
from dllm_spec.drafters.prompt_lookup import PromptLookupDrafter
from dllm_spec.policy import AcceptanceCalibrator, CostAwarePolicy, FixedLength
from dllm_spec.verify.sampling import SamplingParams
from dllm_spec.verify.tree import (
    ancestor_mask,
    build_tree,
    chain_parents,
    check_parents,
    children_lists,
    greedy_tree_accept,
    path_products,
    sampling_tree_accept,
    tree_depths,
)
from dllm_spec.verify.verifier import Verifier
from tests.conftest import (
    VOCAB,
    begin,
    make_drafter,
    prefill,
    propose,
    sampling_target,
    tiny_llama,
    two_token_total_variation,
)

#       root
#      /    \
#     0      1
#    / \      \
#   2   3      4
#   |
#   5
PARENTS = torch.tensor([-1, -1, 0, 0, 1, 2])


def tree_drafter(target, width=3, steps=1, draft_vocab=0):
    return make_drafter(target, steps, draft_vocab=draft_vocab, tree_width=width)


def test_tree_helpers_describe_depths_ancestors_and_children():
    assert tree_depths(PARENTS).tolist() == [0, 0, 1, 1, 1, 2]
    allowed = ancestor_mask(PARENTS)
    # node 5 (row 6) sees the root, node 0, node 2 and itself; nothing of the other branch
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert allowed[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert allowed[0].nonzero().flatten().tolist() == [0]
    assert children_lists(PARENTS) == [[0, 1], [2, 3], [4], [5], [], [], []]
    assert chain_parents(4).tolist() == [-1, 0, 1, 2]
    assert torch.equal(ancestor_mask(chain_parents(4)), torch.ones(5, 5, dtype=torch.bool).tril())
    tree = DraftProposal(torch.tensor([[10, 11, 12, 13, 14, 15]]), None, torch.full((1, 6), 0.5), parents=PARENTS)
    assert tree.limit_depth(1).tokens.tolist() == [[10, 11]] and tree.limit_depth(1).parents.tolist() == [[-1, -1]]
    two = tree.limit_depth(2)  # node 5 (depth 2, 0-based) goes
    assert two.tokens.tolist() == [[10, 11, 12, 13, 14]] and two.parents.tolist() == [[-1, -1, 0, 0, 1]]
    assert tree.limit_depth(3) is tree
    odd = DraftProposal(
        torch.tensor([[1, 2, 3, 4, 5]]), None, torch.full((1, 5), 0.5), parents=torch.tensor([-1, 0, 1, -1, 3])
    )
    assert odd.limit_depth(2).tokens.tolist() == [[1, 2, 4, 5]] and odd.limit_depth(2).parents.tolist() == [
        [-1, 0, -1, 2]
    ]
    for bad in (torch.tensor([0]), torch.tensor([-1, 1]), torch.tensor([-1, -2])):
        with pytest.raises(ValueError, match="parents"):
            check_parents(bad)


def test_build_tree_keeps_the_nodes_of_highest_path_probability():
    gen = torch.Generator().manual_seed(0)
    length, width = 4, 3
    probs = torch.rand(length, width, generator=gen).sort(dim=-1, descending=True).values * 0.5
    cand = torch.stack([torch.randperm(20, generator=gen)[:width] for _ in range(length)])
    # every path of every depth, with its probability
    paths = {}
    for d in range(1, length + 1):
        for cols in itertools.product(range(width), repeat=d):
            paths[cols] = float(torch.tensor([probs[i, c] for i, c in enumerate(cols)]).prod())
    for budget in (1, 5, 12, 40):
        tokens, parents, node_probs = build_tree(cand, probs, budget)
        check_parents(parents)
        assert tokens.numel() == min(budget, len(paths))
        depth = tree_depths(parents)
        # recover each node's path of columns and compare with the best `budget` paths
        cols_of: list[tuple[int, ...]] = []
        for i in range(tokens.numel()):
            prefix = () if parents[i] < 0 else cols_of[parents[i]]
            col = cand[int(depth[i])].tolist().index(int(tokens[i]))
            cols_of.append(prefix + (col,))
            assert node_probs[i] == pytest.approx(float(probs[int(depth[i]), col]))
        best = sorted(paths.values(), reverse=True)[: tokens.numel()]
        assert sorted((paths[c] for c in cols_of), reverse=True) == pytest.approx(best)
    # one candidate per position: the tree is the chain
    tokens, parents, _ = build_tree(cand[:, :1], probs[:, :1], 10)
    assert tokens.tolist() == cand[:, 0].tolist() and parents.tolist() == chain_parents(length).tolist()


def test_greedy_tree_accept_follows_the_targets_argmax_down_the_tree():
    tokens = torch.tensor([7, 3, 5, 9, 2, 4])
    logits = torch.full((7, 12), -5.0)
    for row, best in enumerate(
        [3, 8, 2, 1, 1, 1, 1]
    ):  # root -> 3 (node 1), node 1 -> 2 (node 4), node 4 -> 1 (no child)
        logits[row, best] = 5.0
    result = greedy_tree_accept(tokens, PARENTS, logits)
    assert result.path.tolist() == [1, 4] and result.next_token == 1
    logits[0] = 0
    logits[0, 11] = 5.0  # the root's argmax is no child: nothing accepted, the target's token follows
    result = greedy_tree_accept(tokens, PARENTS, logits)
    assert result.path.tolist() == [] and result.next_token == 11


def test_sampling_tree_accept_draws_every_token_from_the_target_distribution():
    """First committed token ~ p(root); given it is node 0's token, the second ~ p(node 0)."""
    gen = torch.Generator().manual_seed(0)
    vocab = 5
    p = torch.rand(7, vocab, generator=gen).pow(2)
    p = p / p.sum(-1, keepdim=True)
    tokens = torch.tensor([2, 0, 4, 2, 3, 1])  # node 0 = 2, node 1 = 0; node 0's children 4, 2
    draws = 20000
    first = torch.zeros(vocab)
    second_after_node0 = torch.zeros(vocab)
    for _ in range(draws):
        r = sampling_tree_accept(tokens, PARENTS, p, gen)
        seq = [int(tokens[i]) for i in r.path] + [r.next_token]
        first[seq[0]] += 1
        if r.path.numel() and int(r.path[0]) == 0:
            second_after_node0[seq[1]] += 1
    tv1 = 0.5 * (first / draws - p[0]).abs().sum()
    tv2 = 0.5 * (second_after_node0 / second_after_node0.sum() - p[1]).abs().sum()
    assert tv1 < 0.02 and tv2 < 0.03, (tv1, tv2)
    # the check is sharp enough to see a lossy rule: always taking the first child when it has mass
    assert 0.5 * (torch.nn.functional.one_hot(torch.tensor(2), vocab).float() - p[0]).abs().sum() > 0.1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_verification_leaves_the_cache_and_features_a_chain_would(attn):
    target = tiny_llama(0)
    target.config._attn_implementation = attn
    layers = (1, 2)
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9]])
    greedy = target.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=1)[0, 6:].tolist()
    wrong = [(t + 1) % VOCAB for t in greedy]
    # the greedy continuation sits on the second branch, under decoys
    tokens = torch.tensor([[wrong[0], greedy[0], wrong[1], greedy[1], greedy[2], wrong[2]]])
    parents = torch.tensor([-1, -1, 0, 1, 3, 1])
    verifier = Verifier(target, layers)
    prefill(verifier, prompt)
    proposal = DraftProposal(tokens, None, torch.full((1, 6), 0.5), parents=parents)
    out = verifier.verify(prompt[0, -1:], proposal, SamplingParams(), None)
    assert out.paths[0].tolist() == [1, 3, 4] and out.tokens[0].tolist() == greedy
    # a fresh chain forward over the same committed tokens gives the same cache and features
    ref = target(input_ids=torch.cat([prompt, torch.tensor([greedy])], 1), use_cache=True, output_hidden_states=True)
    length = prompt.shape[1] + len(greedy)
    assert verifier.cache.lengths[0] == length
    for i, theirs in enumerate(ref.cache.layers):
        torch.testing.assert_close(verifier.cache.keys[i][:1, :, :length], theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(verifier.cache.values[i][:1, :, :length], theirs.values, rtol=1e-5, atol=1e-5)
    ref_features = torch.cat([ref.hidden_states[i] for i in layers], -1)[:, 5:]  # the root and the 3 accepted
    torch.testing.assert_close(out.features, ref_features, rtol=1e-5, atol=1e-5)
    assert int(out.next_token[0]) == int(ref.logits[0, -1].argmax())


@pytest.mark.parametrize("width,steps,vocab", [(2, 1, 0), (4, 1, 0), (3, 2, 12)])
def test_greedy_output_equals_plain_greedy_with_a_draft_tree(target, width, steps, vocab):
    drafter = tree_drafter(target, width, steps, vocab)
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    ref = target.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=1)[0, 8:]
    for policy in (FixedLength(12), CostAwarePolicy(max_k=12)):
        for d in (drafter, GraftDrafter(PromptLookupDrafter(), drafter)):
            out = DiffusionSpeculator(target, None, d, policy=policy).generate(prompt, max_new_tokens=30)
            assert out.token_ids[0].tolist() == ref.tolist()
            st = out.stats  # per-position statistics count depths, not node indices
            assert len(st.verified_per_position) <= (
                drafter.config.block_size - 1 if d is drafter else 12
            )  # grafted lookups go deeper
            assert all(a <= v for a, v in zip(st.accepted_per_position, st.verified_per_position))


def test_tree_proposals_keep_the_drafter_contract(target):
    """Node count as asked, parents valid, ids in the (draft) vocabulary, no q, deterministic."""
    for drafter in (tree_drafter(target, 3), tree_drafter(target, 3, 2, draft_vocab=12)):
        DiffusionSpeculator(target, None, drafter)
        verifier = Verifier(target, drafter.target_layer_ids)
        ids = torch.tensor([[0, 3, 4, 5, 6]])
        begin(drafter, ids, prefill(verifier, ids))
        for sampling in (SamplingParams(), SamplingParams(1.0)):
            a = propose(drafter, ids, 9, sampling, torch.Generator().manual_seed(0))
            b = propose(drafter, ids, 9, sampling, torch.Generator().manual_seed(1))
            assert a.is_tree and a.q is None and a.tokens.shape == (1, 9) and a.confidence.shape == (1, 9)
            check_parents(a.parents[0])
            assert int(tree_depths(a.parents[0]).max()) < drafter.config.block_size - 1
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
            if drafter.model.draft_vocab.numel():
                assert set(a.tokens.flatten().tolist()) <= set(drafter.model.draft_vocab.tolist())
            assert a.truncate(4).parents.tolist() == a.parents[:, :4].tolist()
    with pytest.raises(ValueError, match="tree_width"):
        tree_drafter(target, 0)


def test_sampling_with_a_draft_tree_keeps_the_target_distribution():
    target = sampling_target()
    spec = DiffusionSpeculator(target, None, tree_drafter(target, 3), policy=FixedLength(6))
    tv = two_token_total_variation(spec, target, draws=1500, batch=30)
    assert tv < 0.1, f"TV {tv:.3f}"


def test_policy_reads_a_tree_by_paths():
    accept = torch.tensor([0.5, 0.4, 0.8, 0.5, 1.0, 0.5])
    assert path_products(accept, PARENTS).tolist() == pytest.approx([0.5, 0.4, 0.4, 0.25, 0.4, 0.2])
    cal = AcceptanceCalibrator(bins=2, prior_strength=1.0)
    # path: node 1 then node 4; tested: the root's children (0, 1) and node 1's child (4); node 0's subtree untested
    conf = torch.tensor([0.9, 0.2, 0.9, 0.9, 0.2, 0.9])
    cal.update(conf, 6, 2, PARENTS, torch.tensor([1, 4]))
    assert cal.trials.tolist() == [3.0, 2.0] and cal.accepted.tolist() == [
        2.25,
        0.75,
    ]  # prior 1 trial each, means 0.25 / 0.75
    # the cost-aware policy counts a tree's expected accepted tokens along paths
    policy = CostAwarePolicy(max_k=6, latency=None)
    from dllm_spec.latency import LatencyCurve

    policy.latency = LatencyCurve({1: 1.0, 8: 1.0})  # verifying is free: take every node worth anything
    proposal = DraftProposal(torch.arange(6).unsqueeze(0), None, conf.unsqueeze(0), parents=PARENTS)
    assert policy.choose(proposal) == [6]
    chain = CostAwarePolicy(max_k=6, latency=LatencyCurve({1: 1.0, 8: 1.0}))
    chain.choose(DraftProposal(torch.arange(6).unsqueeze(0), None, conf.unsqueeze(0)))
    assert policy.last_prediction > chain.last_prediction  # siblings add the chance the chain misses


def test_grafting_a_chain_shares_agreeing_nodes_and_keeps_a_best_first_tree():
    from dllm_spec.verify.tree import graft_chain

    tokens, parents, scores = torch.tensor([5, 6, 7]), torch.tensor([-1, -1, 0]), torch.tensor([0.6, 0.3, 0.5])
    t, p, s = graft_chain(tokens, parents, scores, torch.tensor([5, 9, 10]), torch.tensor([1.0, 1.0, 1.0]))
    check_parents(p)
    # 5 is shared, 9 and 10 hang below it; the sure chain comes first, then the rest by path score
    assert t.tolist() == [5, 9, 10, 7, 6] and p.tolist() == [-1, 0, 1, 0, -1]
    paths = {tuple(int(t[j]) for j in _path(p, i)) for i in range(t.numel())}
    assert paths == {(5,), (6,), (5, 7), (5, 9), (5, 9, 10)}


def _path(parents: torch.Tensor, node: int) -> list[int]:
    out = [node]
    while int(parents[out[-1]]) >= 0:
        out.append(int(parents[out[-1]]))
    return out[::-1]


def test_prompt_lookup_merged_into_a_tree_drafter_keeps_greedy_and_sampling_exact(target):
    """The pair with a tree drafter grafts every lookup onto the tree (the lookup's continuation is a
    path of the proposal); greedy output stays the target's, sampling keeps its distribution."""
    drafter = GraftDrafter(PromptLookupDrafter(), tree_drafter(target, 3))
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7, 5, 9, 14, 5, 9, 22, 7, 5, 9]])
    DiffusionSpeculator(target, None, drafter)
    verifier = Verifier(target, drafter.target_layer_ids)
    begin(drafter, prompt, prefill(verifier, prompt))
    lookup = propose(PromptLookupDrafter(), prompt, 12, SamplingParams(), None).tokens[0].tolist()
    merged = propose(drafter, prompt, 12, SamplingParams(), None)
    assert merged.is_tree and lookup
    paths = [[int(merged.tokens[0, j]) for j in _path(merged.parents[0], i)] for i in range(merged.length)]
    assert any(len(q) >= 2 and q == lookup[: len(q)] for q in paths)
    ref = target.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=1)[0, prompt.shape[1] :]
    out = DiffusionSpeculator(target, None, drafter, policy=FixedLength(12)).generate(prompt, max_new_tokens=24)
    assert out.token_ids[0].tolist() == ref.tolist()
    sampler = sampling_target()
    spec = DiffusionSpeculator(
        sampler, None, GraftDrafter(PromptLookupDrafter(), tree_drafter(sampler, 3)), policy=FixedLength(6)
    )
    tv = two_token_total_variation(spec, sampler, draws=1500, prompt=(0, 2, 3, 2), batch=30)
    assert tv < 0.1, f"TV {tv:.3f}"
