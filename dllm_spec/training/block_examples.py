"""Training examples of the block-diffusion drafter and what is computed on them: anchored,
noised blocks (:class:`BlockBatch`), the drafter's states on them in one forward
(:func:`block_states`), the position-decayed (and optionally distilled) loss
(:func:`weighted_loss`), the offline greedy tau (:func:`offline_tau`), and the reduced draft
vocabulary.

Glossary (shapes): N sequences, T padded length, A anchors per sequence, B block size (the
anchor token + B-1 body positions), L = B-1 body positions, H hidden size, V_draft draft vocabulary.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dllm_spec.drafters.base import target_vocab_size
from dllm_spec.drafters.block_diffusion import BlockDiffusionModel
from dllm_spec.training.features import FeatureStore, ResidentStore, TeacherStore
from dllm_spec.training.sequences import Sequence

if TYPE_CHECKING:  # the run's config; only its block/noise fields are read here
    from dllm_spec.training.block_diffusion import TrainConfig


def build_draft_vocab(sequences: list[Sequence], size: int, always: list[int]) -> torch.Tensor:
    """The ``size`` most frequent response tokens (plus ``always``), sorted target ids."""
    counts = Counter(t for s in sequences for t in s.ids[s.prompt_len :])
    chosen = set(always) | {t for t, _ in counts.most_common(max(0, size - len(always)))}
    return torch.tensor(sorted(chosen), dtype=torch.long)


def draft_vocab_map(vocab: torch.Tensor, size: int) -> torch.Tensor:
    """Target id -> draft id for the sorted draft vocabulary ``vocab`` (-1 outside it): (size,)."""
    mapping = torch.full((size,), -1, dtype=torch.long)
    mapping[vocab] = torch.arange(len(vocab))
    return mapping


def sequence_features(
    store: FeatureStore | ResidentStore, seqs: list[Sequence], device: torch.device | str
) -> torch.Tensor:
    """Cached target features of a batch of sequences, right-padded: (N, T, n * H)."""
    return store.batch([(s.shard, s.row) for s in seqs], [len(s.ids) for s in seqs], device)


def block_teacher(
    store: TeacherStore | ResidentStore, seqs: list[Sequence], batch: "BlockBatch", device: torch.device | str
) -> torch.Tensor:
    """The target's cached top-k distribution of every block body label: (N, A, B-1, 2k). Body
    position j of anchor a is token a + j, predicted by the target at position a + j - 1."""
    table = store.batch([(s.shard, s.row) for s in seqs], [len(s.ids) for s in seqs])  # (N, T, 2k)
    n, A = batch.anchor.shape
    L = batch.body_tokens.shape[-1]
    pos = (batch.anchor.unsqueeze(-1) + torch.arange(L)).clamp(max=table.shape[1] - 1).to(table.device)  # (N, A, L)
    gathered = table.gather(1, pos.view(n, A * L, 1).expand(n, A * L, table.shape[-1]))  # (N, A*L, 2k)
    return gathered.view(n, A, L, -1).to(device)


class BlockBatch:
    """Anchored, noised blocks of a batch of sequences, ready for one training forward."""

    def __init__(
        self,
        seqs: list[Sequence],
        cfg: "TrainConfig",
        vocab_map: torch.Tensor,
        rng: random.Random,
        noised: bool = True,
        anchors: list[list[int]] | None = None,
    ) -> None:
        n, B, A = len(seqs), cfg.block_size, cfg.anchors_per_seq
        width = max(len(s.ids) for s in seqs)
        self.ids = torch.zeros((n, width), dtype=torch.long)
        self.attention = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            self.ids[i, : len(s.ids)] = torch.tensor(s.ids)
            self.attention[i, : len(s.ids)] = 1
        if anchors is None:
            anchors = []
            for s in seqs:
                choices = list(range(s.prompt_len - 1, len(s.ids) - 1))
                picks = rng.sample(choices, min(A, len(choices)))
                anchors.append(picks + [picks[-1]] * (A - len(picks)))  # pad by repeating (weight dropped below)
        a = torch.tensor(anchors)  # (N, A)
        A = a.shape[1]
        offsets = torch.arange(B)  # (B,)
        pos = a.unsqueeze(-1) + offsets  # (N, A, B) absolute positions
        valid = pos < self.attention.sum(1).view(n, 1, 1)
        gathered = self.ids.gather(1, pos.clamp(max=width - 1).view(n, -1)).view(n, A, B)
        self.anchor = a
        self.positions = pos.view(n, A * B)
        self.first_tokens = gathered[:, :, 0]  # (N, A)
        labels = gathered[:, :, 1:]  # (N, A, B-1)
        label_valid = valid[:, :, 1:]
        draft_labels = vocab_map[labels]  # -1 where outside the draft vocabulary
        # noise: which body positions are masked
        if noised:
            full = torch.rand((n, A, 1)) < cfg.full_mask_prob
            t = cfg.t_min + (1 - cfg.t_min) * torch.rand((n, A, 1))
            masked = full | (torch.rand((n, A, B - 1)) < t)
        else:
            masked = torch.ones((n, A, B - 1), dtype=torch.bool)
        dup = torch.zeros((n, A), dtype=torch.bool)
        for i, row in enumerate(anchors):
            seen = set()
            for j, x in enumerate(row):
                dup[i, j] = x in seen
                seen.add(x)
        self.masked = masked
        self.body_tokens = labels
        self.labels = draft_labels
        self.loss_mask = masked & label_valid & (draft_labels >= 0) & ~dup.unsqueeze(-1)
        self.label_valid = label_valid & ~dup.unsqueeze(-1)
        self.on_policy = torch.tensor([s.on_policy for s in seqs])  # (N,) False: off-policy text

    def attention_mask(self, width: int, block: int) -> torch.Tensor:
        """(N, 1, A*B, T + A*B) bool: a block sees context keys before its anchor, and its own block."""
        n, A = self.anchor.shape
        ctx = torch.arange(width).view(1, 1, 1, width) < self.anchor.view(n, A, 1, 1)  # (N, A, 1, T)
        ctx = ctx & self.attention.bool().view(n, 1, 1, width)
        ctx = ctx.expand(n, A, block, width).reshape(n, A * block, width)
        blk = torch.block_diag(*[torch.ones(block, block, dtype=torch.bool)] * A).expand(n, -1, -1)
        return torch.cat([ctx, blk], dim=-1).unsqueeze(1)


def block_states(
    model: BlockDiffusionModel, batch: BlockBatch, features: torch.Tensor, embed: torch.nn.Module, block: int
) -> torch.Tensor:
    """Final drafter states of every block body position: (N, A, B-1, H)."""
    n, A = batch.anchor.shape
    width = features.shape[1]
    dev = features.device
    fused = model.fuse_context(features)
    ctx_kv = model.context_kv(fused, torch.arange(width, device=dev).unsqueeze(0))
    first = embed(batch.first_tokens.to(dev)).unsqueeze(2)  # (N, A, 1, H)
    body = torch.where(
        batch.masked.to(dev).unsqueeze(-1), model.mask_vector(embed).to(first.dtype), embed(batch.body_tokens.to(dev))
    )  # (N, A, B-1, H)
    last = fused.gather(
        1, (batch.anchor.to(dev) - 1).clamp_min(0).unsqueeze(-1).expand(n, A, fused.shape[-1])
    )  # (N, A, H)
    last = last * (batch.anchor.to(dev) > 0).unsqueeze(-1)  # no context before position 0
    x = model.block_inputs(torch.cat([first, body], dim=2), last).view(n, A * block, -1)  # (N, A, B, H) -> (N, A*B, H)
    mask = batch.attention_mask(width, block).to(dev)
    hidden = model.block_hidden(x, ctx_kv, batch.positions.to(dev), mask).view(n, A, block, -1)
    return hidden[:, :, 1:]


def weighted_loss(
    states: torch.Tensor,
    batch: BlockBatch,
    head: torch.Tensor,
    gamma: float,
    teacher: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    vocab_map: torch.Tensor | None = None,
    on_policy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position-decayed cross-entropy over the loss positions only (the LM head, a third of a
    step's compute, runs on those rows alone): weight exp(-(j-1)/gamma) at block position j.

    With ``teacher`` (N, A, L, 2k) from :func:`block_teacher` and ``distill_weight`` w > 0 the
    per-position loss is (1 - w) * CE(label) + w * CE(teacher top-k renormalised over the draft
    vocabulary) (``vocab_map``: target id -> draft id, -1 outside). ``on_policy`` (N,) bool: rows
    that are False hold text the target did not write, so their loss is the teacher term alone
    (w = 1 there): the drafter learns what the target would say, not what the text says."""
    n, A, L, _ = states.shape
    dev = states.device
    selected = batch.loss_mask.to(dev)  # (N, A, L)
    w = torch.exp(-torch.arange(L, device=dev, dtype=torch.float32) / gamma).expand(n, A, L)[selected]  # (M,)
    logits = states[selected] @ head.T  # (M, V_draft)
    ce = F.cross_entropy(logits.float(), batch.labels.to(dev)[selected], reduction="none")
    off = (
        None
        if on_policy is None or bool(on_policy.all())
        else ~on_policy.to(dev).view(n, 1, 1).expand(n, A, L)[selected]
    )
    if off is not None and teacher is None:
        raise ValueError("off-policy rows need the teacher's distribution (teacher=None)")
    if teacher is not None and (distill_weight > 0 or off is not None):
        if vocab_map is None:
            raise ValueError("distillation needs vocab_map (target id -> draft id)")
        k = teacher.shape[-1] // 2
        rows = teacher[selected]  # (M, 2k)
        ids = vocab_map.to(dev)[rows[:, :k].long()]  # (M, k) draft ids, -1 outside the draft vocabulary
        p = torch.where(ids >= 0, rows[:, k:].exp(), torch.zeros_like(rows[:, k:]))
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        logq = torch.log_softmax(logits.float(), dim=-1).gather(1, ids.clamp_min(0))  # (M, k)
        soft = -(p * logq).sum(-1)
        mix = torch.full_like(soft, distill_weight) if off is None else torch.where(off, 1.0, distill_weight)  # (M,)
        ce = (1 - mix) * ce + mix * soft
    return (ce * w).sum() / w.sum().clamp_min(1e-6)


@torch.no_grad()
def offline_tau(
    model: BlockDiffusionModel,
    target,
    sequences: list[Sequence],
    cfg: "TrainConfig",
    head: torch.Tensor,
    vocab: torch.Tensor,
    store: FeatureStore | ResidentStore,
    anchors: int = 24,
) -> float:
    """Greedy tau the drafter would reach with one denoising step and a full block, measured on
    held-out greedy sequences (which are the target's own greedy continuations): 1 + mean number
    of leading drafted tokens equal to the continuation."""
    was_training = model.training
    model.eval()
    rng = random.Random(1234)
    seqs = [s for s in sequences if s.greedy][: cfg.eval_sequences]
    if not seqs:
        return float("nan")
    accepted = []
    vocab_map = draft_vocab_map(vocab, target_vocab_size(target))
    ecfg = replace(cfg, anchors_per_seq=anchors)
    for i in range(0, len(seqs), cfg.batch_size):
        chunk = seqs[i : i + cfg.batch_size]
        batch = BlockBatch(chunk, ecfg, vocab_map, rng, noised=False)
        feats = sequence_features(store, chunk, target.device)
        logits = (
            block_states(model, batch, feats, target.get_input_embeddings(), cfg.block_size) @ head.T
        )  # (N, A, B-1, V_draft)
        pred = vocab.to(logits.device)[logits.argmax(-1)]  # (N, A, L) target ids
        match = (pred.cpu() == batch.body_tokens) & batch.label_valid
        full_valid = batch.label_valid.all(-1)  # only blocks with a full continuation
        n_acc = match.long().cumprod(-1).sum(-1)
        accepted += n_acc[full_valid].tolist()
    model.train(was_training)
    return 1.0 + sum(accepted) / max(1, len(accepted))
