"""A free drafter with a model drafter (drafters/composite.py)."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import CostAwarePolicy, FixedLength
from dllm_spec.verify.sampling import SamplingParams
from tests.conftest import (
    begin,
    commit,
    make_drafter,
    propose,
    sampling_target,
    two_token_total_variation,
)


def test_fallback_drafter_uses_the_free_drafter_when_it_matches_and_keeps_greedy_output(target):
    """Prompt lookup's proposal when it matches an n-gram of >= 2 tokens, the block-diffusion
    drafter's otherwise (and then exactly what a block-diffusion drafter alone proposes, although
    it sat out earlier cycles); greedy output equals plain greedy under both policies."""
    from dllm_spec.drafters import FallbackDrafter, NullDrafter, PromptLookupDrafter, build_drafter
    from dllm_spec.training.features import compute_features

    lone, hybrid = make_drafter(target, 1), FallbackDrafter(PromptLookupDrafter(), make_drafter(target, 1))
    assert hybrid.name == f"prompt-lookup+{lone.name}" and hybrid.target_layer_ids == lone.target_layer_ids
    DiffusionSpeculator(target, None, hybrid)  # binds both
    DiffusionSpeculator(target, None, lone)
    ids = [0, 5, 9, 14, 5, 9, 31]  # "5 9" repeats: a 2-gram match after 6 tokens; nothing matches after 31
    feats = compute_features(
        target, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), list(lone.target_layer_ids)
    )
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
        spec = DiffusionSpeculator(
            target, None, FallbackDrafter(PromptLookupDrafter(), make_drafter(target, 1)), policy=policy
        )
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
    from dllm_spec.drafters import FallbackDrafter, PromptLookupDrafter

    target = sampling_target()
    hybrid = FallbackDrafter(PromptLookupDrafter(), make_drafter(target, 1), min_confidence=0.0)
    spec = DiffusionSpeculator(target, None, hybrid, policy=FixedLength(3))
    tv = two_token_total_variation(
        spec, target, draws=1500, prompt=(0, 2, 3, 2), batch=30
    )  # "2" recurs: lookup proposes first
    assert tv < 0.1, f"TV {tv:.3f}"


def test_tree_drafters_are_grafted_and_chain_drafters_fall_back(target):
    """``pair_drafter`` (and the ``A+B`` spec) picks the combination from the model drafter's
    tree width; each class refuses the other kind, naming the one to use."""
    from dllm_spec.drafters import FallbackDrafter, GraftDrafter, PromptLookupDrafter, pair_drafter

    chain, tree = make_drafter(target, 1), make_drafter(target, 1, tree_width=3)
    assert isinstance(pair_drafter(PromptLookupDrafter(), chain), FallbackDrafter)
    assert isinstance(pair_drafter(PromptLookupDrafter(), tree), GraftDrafter)
    with pytest.raises(ValueError, match="GraftDrafter"):
        FallbackDrafter(PromptLookupDrafter(), tree)
    with pytest.raises(ValueError, match="FallbackDrafter"):
        GraftDrafter(PromptLookupDrafter(), chain)
    with pytest.raises(ValueError, match="min_confidence"):
        FallbackDrafter(PromptLookupDrafter(), chain, min_confidence=1.5)


def test_grafted_lookup_chain_is_one_more_branch_of_the_tree(target):
    """Where prompt lookup matches, its chain hangs in the tree (every lookup token is a node, its
    ancestors the chain's earlier tokens); where it does not, the tree is the model drafter's own."""
    from dllm_spec.drafters import GraftDrafter, PromptLookupDrafter
    from dllm_spec.training.features import compute_features

    lone, graft = (
        make_drafter(target, 1, tree_width=3),
        GraftDrafter(PromptLookupDrafter(), make_drafter(target, 1, tree_width=3)),
    )
    DiffusionSpeculator(target, None, graft)
    DiffusionSpeculator(target, None, lone)
    ids = [0, 5, 9, 14, 5, 9]  # "5 9" repeats: lookup proposes 14, 5, 9
    feats = compute_features(
        target, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), list(lone.target_layer_ids)
    )
    for d in (graft, lone):
        begin(d, torch.tensor([ids]), feats[:, :5])
    got = propose(graft, torch.tensor([ids]), 12, SamplingParams(), None)
    mine = propose(lone, torch.tensor([ids]), 12, SamplingParams(), None)
    assert got.is_tree and graft.last_source == lone.name
    tokens, parents = got.tokens[0].tolist(), got.parents[0].tolist()
    node = -1
    for t in (14, 5, 9):  # walk the lookup chain down the tree
        children = [i for i, (tok, par) in enumerate(zip(tokens, parents)) if tok == t and par == node]
        assert len(children) == 1, f"lookup token {t} is not a child of node {node}"
        node = children[0]

    def paths(toks: list[int], pars: list[int]) -> set[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for tok, par in zip(toks, pars):
            out.append((out[par] if par >= 0 else ()) + (tok,))
        return set(out)

    lookup = {(14,), (14, 5), (14, 5, 9)}
    assert paths(tokens, parents) <= paths(mine.tokens[0].tolist(), mine.parents[0].tolist()) | lookup  # nothing else
