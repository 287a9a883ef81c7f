"""Draft trees: several candidate continuations verified in ONE target forward (SpecInfer,
Medusa, EAGLE-2), as pure tensor functions on one sequence.

A tree of N draft nodes is ``tokens`` (N,) long and ``parents`` (N,) long: ``parents[i]`` is the
index of node i's parent, ``-1`` for a child of the last committed token (the *root*). Nodes are in
topological order (``parents[i] < i``), so the first k nodes of a tree form a tree: a block-length
policy can truncate it like a chain. A chain of k drafts is ``parents = [-1, 0, 1, ..., k-2]``.

The target reads [root, node_0, ..., node_{N-1}] in one forward where each row attends to the
cached context, the root and its own ancestors only (:func:`ancestor_mask`), at position
``context + depth`` (:func:`tree_depths`). Its logits row 0 is the distribution after the root,
row 1 + i the one after node i.

Acceptance walks down from the root and returns the accepted path (node indices, one per depth):

* :func:`greedy_tree_accept`: follow the child equal to the target's argmax. The committed tokens
  are exactly the target's greedy continuation (any tree, any candidates).
* :func:`sampling_tree_accept`: at each node, test its children in order; with the residual r
  (the target's p with the already rejected children zeroed), accept child c with probability
  r(c) / sum(r); if every child is rejected, sample from the normalised r. This is sampling
  x ~ p written as a sequence of yes/no questions ("is it c1? else is it c2? ..."), so every
  committed token is an exact draw from the target's distribution at its position, whatever the
  candidates were (they must not depend on the draw: a deterministic tree, e.g. a drafter's
  top-m). With one child per node it is match acceptance.

:func:`build_tree` grows a tree from per-position candidate lists best-first by the product of
the drafter's probabilities along the path (EAGLE-2's dynamic tree, for independent per-position
marginals as a one-pass diffusion drafter gives them): for a budget of N nodes it keeps the N
nodes of highest path probability, i.e. maximises the drafter's own expected accepted length.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from dllm_spec.verify.sampling import sample


def check_parents(parents: torch.Tensor) -> None:
    """Raise ValueError unless ``parents`` (N,) is a valid topologically ordered tree."""
    if parents.dim() != 1:
        raise ValueError(f"parents must be 1-D (N,), got shape {tuple(parents.shape)}")
    idx = torch.arange(parents.numel(), device=parents.device)
    if bool(((parents < -1) | (parents >= idx)).any()):
        raise ValueError(f"tree parents must satisfy -1 <= parents[i] < i (topological order), got {parents.tolist()}")


def chain_parents(k: int, device: torch.device | None = None) -> torch.Tensor:
    """Parents of a chain of k drafts: [-1, 0, ..., k-2]."""
    return torch.arange(-1, k - 1, device=device)


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N,) long: 0 for children of the root, parent's depth + 1 otherwise."""
    depth: list[int] = []
    for p in parents.tolist():  # plain Python: no per-node kernel launches on an accelerator
        depth.append(0 if p < 0 else depth[p] + 1)
    return torch.tensor(depth, dtype=torch.long, device=parents.device)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N+1, N+1) bool over [root, nodes]: entry [r, c] is True when c is r or an ancestor of r."""
    n = parents.numel()
    allowed = torch.eye(n + 1, dtype=torch.bool)  # built on the CPU, moved once
    allowed[:, 0] = True
    for i, p in enumerate(parents.tolist()):
        allowed[i + 1] |= allowed[p + 1]  # row of the parent (row 0 is the root)
    return allowed.to(parents.device)


def children_lists(parents: torch.Tensor) -> list[list[int]]:
    """children[0] = the root's children, children[1 + i] = node i's, each in node order."""
    children: list[list[int]] = [[] for _ in range(parents.numel() + 1)]
    for i, p in enumerate(parents.tolist()):
        children[p + 1].append(i)
    return children


def path_products(values: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """(N,) per-node values (e.g. the probability a node is accepted given its parent was) -> (N,)
    their product along each node's path from the root."""
    out = values.clone()
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            out[i] = values[i] * out[p]
    return out


def reindex(parents: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Parents of the sub-tree made of the nodes ``index`` (M,) long, in that order: each kept node's
    parent must be kept and come before it. Returns (M,) parents in the new numbering."""
    new_index = torch.full_like(parents, -1)
    new_index[index] = torch.arange(index.numel(), device=parents.device)
    old = parents[index]
    return torch.where(old < 0, old, new_index[old.clamp_min(0)])


@dataclass(frozen=True)
class TreeAcceptResult:
    """path: (n,) long, the accepted node indices from the root down; next_token: the target's own token after them."""

    path: torch.Tensor
    next_token: int


def greedy_tree_accept(tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor) -> TreeAcceptResult:
    """Follow the target's argmax from the root. tokens, parents: (N,); target_logits: (N+1, V)."""
    return follow_choices(tokens, parents, target_logits.argmax(dim=-1).tolist())


def follow_choices(tokens: torch.Tensor, parents: torch.Tensor, choice: list[int]) -> TreeAcceptResult:
    """Walk down from the root taking, at each row (0 = root, 1 + i = node i), the child whose token
    is ``choice[row]``, until no child matches; next_token is that row's choice."""
    toks = tokens.tolist()
    children = children_lists(parents)
    path: list[int] = []
    row = 0
    while True:
        nxt = next((c for c in children[row] if toks[c] == choice[row]), None)
        if nxt is None:
            return TreeAcceptResult(torch.tensor(path, dtype=torch.long, device=tokens.device), int(choice[row]))
        path.append(nxt)
        row = nxt + 1


def sampling_tree_accept(
    tokens: torch.Tensor, parents: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
) -> TreeAcceptResult:
    """Lossless acceptance for a deterministic tree. tokens, parents: (N,); p: (N+1, V) the target's
    (warped) distributions; randomness from ``generator`` only."""
    toks = tokens.tolist()
    children = children_lists(parents)
    path: list[int] = []
    row = 0
    while True:
        residual = p[row].clone()  # (V,)
        nxt = None
        for c in children[row]:
            mass = residual.sum()
            u = torch.rand((), generator=generator, device=p.device)
            if u * mass < residual[toks[c]]:  # probability r(c) / sum(r)
                nxt = c
                break
            residual[toks[c]] = 0.0
        if nxt is None:
            if not bool(
                residual.sum() > 0
            ):  # every token with mass was a rejected candidate: impossible up to rounding
                residual = p[row]
            token = int(sample((residual / residual.sum()).unsqueeze(0), generator)[0])
            return TreeAcceptResult(torch.tensor(path, dtype=torch.long, device=tokens.device), token)
        path.append(nxt)
        row = nxt + 1


def build_tree(
    candidates: torch.Tensor, probs: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best-first tree from per-position candidates.

    candidates: (L, m) long, position j's m candidate tokens (column 0 the drafter's first choice);
    probs: (L, m) the drafter's probability of each. Returns (tokens (N,), parents (N,), node_probs
    (N,)) with N = min(budget, nodes available): the nodes of highest path probability (the
    product of probs from the root), a node's children in candidate order. The first-choice chain
    is always a prefix-closed part of it when its path probabilities dominate.
    """
    length, width = candidates.shape
    if budget <= 0 or length == 0:
        empty = torch.zeros(0, dtype=torch.long, device=candidates.device)
        return empty, empty.clone(), torch.zeros(0, device=candidates.device)
    cand, pr = candidates.tolist(), probs.float().tolist()
    # heap entries: (-path prob, tie-break counter, depth, column, parent node)
    heap = [(-pr[0][j], j, 0, j, -1) for j in range(width)]
    heapq.heapify(heap)
    counter = width
    tokens, parents, node_probs = [], [], []
    while heap and len(tokens) < budget:
        neg, _, depth, j, parent = heapq.heappop(heap)
        tokens.append(cand[depth][j])
        parents.append(parent)
        node_probs.append(pr[depth][j])
        me = len(tokens) - 1
        if depth + 1 < length:
            for j2 in range(width):
                heapq.heappush(heap, (neg * pr[depth + 1][j2], counter, depth + 1, j2, me))
                counter += 1
    device = candidates.device
    return (
        torch.tensor(tokens, dtype=torch.long, device=device),
        torch.tensor(parents, dtype=torch.long, device=device),
        torch.tensor(node_probs, dtype=torch.float32, device=device),
    )


def graft_chain(
    tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, chain: torch.Tensor, chain_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add a chain of drafts hanging from the root to a tree, sharing the nodes whose tokens agree.

    tokens, parents, scores: (N,) the tree and each node's confidence given its parent; chain,
    chain_scores: (L,). Returns the merged tree re-ordered best-first by the product of scores
    along each path (a stable sort; with scores <= 1 a child never outranks its parent, so the
    order stays topological and any prefix is a tree).
    """
    toks, pars, sc = tokens.tolist(), parents.tolist(), scores.float().tolist()
    children = {}
    for i, (t, p) in enumerate(zip(toks, pars)):
        children.setdefault((p, t), i)
    cur = -1
    for t, s in zip(chain.tolist(), chain_scores.float().tolist()):
        node = children.get((cur, t))
        if node is None:
            toks.append(t)
            pars.append(cur)
            sc.append(s)
            node = len(toks) - 1
            children[(cur, t)] = node
        else:
            sc[node] = max(sc[node], s)  # two drafters agree: the more confident one's belief
        cur = node
    device = tokens.device
    parents_t = torch.tensor(pars, dtype=torch.long, device=device)
    scores_t = torch.tensor(sc, dtype=torch.float32, device=device).clamp(0, 1)
    order = torch.sort(-path_products(scores_t, parents_t), stable=True).indices  # (N',) new position -> old node
    new_parents = reindex(parents_t, order)
    check_parents(new_parents)
    return torch.tensor(toks, dtype=torch.long, device=device)[order], new_parents, scores_t[order]
