"""Training the token-only drafters of the fair comparison with the block-diffusion drafter: a small autoregressive
LM (standard speculative decoding) and a small masked-diffusion LM (SpecDiff-style MDLM), on the
same self-distillation data, held-out split and time budget as the block-diffusion drafter.

Both share the target's tokenizer; their token embeddings start from the target's, projected to
the drafter width by PCA (a cheap, useful start). Each objective is a class:

- :class:`NextTokenObjective`: a small ``LlamaForCausalLM``, next-token cross-entropy on response
  tokens. Its offline greedy tau is exact with teacher forcing: greedy drafting accepts the leading
  positions whose argmax equals the target's continuation, and while they match the drafter's own
  prefix *is* that continuation.
- :class:`MaskedBlockObjective`: a small ``BertForMaskedLM`` with a new ``<|mask|>`` token (one row
  past the target's vocabulary, so no target id is reused). Examples are trailing windows of the
  context followed by the block [MASK x (B-1)] with each block position masked with probability
  t ~ U(t_min, 1) (at least one), exactly how :class:`dllm_spec.drafters.MaskedDiffusionDrafter` drafts;
  loss on masked positions, weighted 1/t (MDLM). Offline tau: one denoising step, full block.

Training runs on the shared loop (:mod:`dllm_spec.training.loop`: one run-directory and
checkpoint format); each checkpoint is a plain transformers directory with the tokenizer, loadable
by ``AutoregressiveDrafter.from_pretrained`` / ``MaskedDiffusionDrafter.from_pretrained``.
"""

from __future__ import annotations

import copy
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dllm_spec.drafters.base import target_vocab_size
from dllm_spec.training.loop import ScheduleConfig, TrainingTask, check_resume, resume_dir, run_training
from dllm_spec.training.sequences import DataDirs, Sequence, load_sequences

MASK_TOKEN = "<|mask|>"


@dataclass(frozen=True)
class TokenDrafterConfig(ScheduleConfig):
    """Size and examples of a token-only drafter (the schedule fields come from
    :class:`~dllm_spec.training.loop.ScheduleConfig`)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    block_size: int = 16
    window: int = 64
    examples_per_seq: int = 4
    lr: float = 1e-3
    warmup_steps: int = 20
    max_steps: int = 400
    t_min: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "window", "examples_per_seq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.block_size < 2:
            raise ValueError("block_size must be >= 2")
        if not 0 < self.t_min <= 1:
            raise ValueError("t_min must be in (0, 1]")


def projected_embeddings(target: PreTrainedModel, width: int, rows: int) -> torch.Tensor:
    """The target's token embeddings projected to ``width`` dims by PCA, scaled to the target's
    per-entry std: (rows, width); rows past the target's vocabulary get small random vectors."""
    emb = target.get_input_embeddings().weight.detach().float().cpu()  # (V, H)
    centered = emb - emb.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)  # v (H, H)
    proj = centered @ v[:width].T  # (V, width)
    proj = proj * (emb.std() / proj.std())
    out = torch.randn(rows, width) * float(emb.std())
    out[: proj.shape[0]] = proj
    return out


def _teacher_forced_leading(correct: torch.Tensor) -> torch.Tensor:
    """(n, L) bool, correct[i, j]: draft j equals the continuation -> leading run length (n,)."""
    return correct.long().cumprod(-1).sum(-1)


class Objective(ABC):
    """What a token drafter is, how it is trained, and how its offline tau is measured."""

    kind: str

    @abstractmethod
    def build(
        self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: TokenDrafterConfig
    ) -> PreTrainedModel: ...

    @abstractmethod
    def load(self, path: Path) -> PreTrainedModel: ...

    @abstractmethod
    def loss(
        self, model: PreTrainedModel, seqs: list[Sequence], cfg: TokenDrafterConfig, rng: random.Random
    ) -> torch.Tensor: ...

    @abstractmethod
    def leading_matches(
        self, model: PreTrainedModel, seq: Sequence, anchors: list[int], cfg: TokenDrafterConfig
    ) -> list[int]: ...

    def save_tokenizer(self, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
        tokenizer.save_pretrained(path)


class NextTokenObjective(Objective):
    """A small causal LM drafting token by token (the standard speculative-decoding drafter)."""

    kind = "ar"

    def build(self, target, tokenizer, cfg):
        vocab = target_vocab_size(target)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=max(2048, cfg.max_len),
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(projected_embeddings(target, cfg.hidden_size, vocab))
        return model

    def load(self, path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    @staticmethod
    def _batch(seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(s.ids) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # (N, T) right-padded
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(seqs):
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
            attention[i, : len(s.ids)] = 1
            labels[i, s.prompt_len : len(s.ids)] = torch.tensor(s.ids[s.prompt_len :])  # response tokens only
        return ids, attention, labels

    def loss(self, model, seqs, cfg, rng):
        ids, attention, labels = (t.to(model.device) for t in self._batch(seqs))
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # (N, T-1, V): position i predicts i+1
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    def leading_matches(self, model, seq, anchors, cfg):
        ids = torch.tensor([seq.ids], device=model.device)
        pred = model(input_ids=ids).logits[0].argmax(-1).cpu()  # (T,): position i predicts token i+1
        out = []
        for a in anchors:  # a = last committed position; drafts predict a+1 .. a+B-1
            span = range(a, min(a + cfg.block_size - 1, len(seq.ids) - 1))
            correct = torch.tensor([bool(pred[i] == seq.ids[i + 1]) for i in span])
            out.append(int(_teacher_forced_leading(correct.unsqueeze(0))[0]))
        return out


class MaskedBlockObjective(Objective):
    """A small bidirectional masked LM drafting a trailing block of masks (SpecDiff / DiffuSpec style)."""

    kind = "mdlm"

    def build(self, target, tokenizer, cfg):
        vocab = target_vocab_size(target)
        config = BertConfig(
            vocab_size=vocab + 1,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.window + cfg.block_size,
            type_vocab_size=1,
            mask_token_id=vocab,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        config.draft_window, config.draft_block_size = (
            cfg.window,
            cfg.block_size - 1,
        )  # masks drafted; read by MaskedDiffusionDrafter.from_pretrained
        model = BertForMaskedLM(config)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(projected_embeddings(target, cfg.hidden_size, vocab + 1))
        return model

    def load(self, path):
        return AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32)

    def save_tokenizer(self, tokenizer, path):
        tok = copy.deepcopy(tokenizer)
        tok.add_special_tokens({"mask_token": MASK_TOKEN})
        tok.save_pretrained(path)

    @staticmethod
    def _examples(
        model,
        seq: Sequence,
        anchors: list[int],
        cfg: TokenDrafterConfig,
        t: list[float] | None,
        rng: random.Random | None,
    ):
        """(ids (n, W+B-1), masked (n, B-1), labels (n, B-1), valid (n, B-1)) for anchors a: the
        window ending at token a, then the block body a+1..a+B-1 (masked where drawn)."""
        mask_id, length = int(model.config.mask_token_id), cfg.block_size - 1
        rows, masks, labels, valid = [], [], [], []
        for k, a in enumerate(anchors):
            ctx = seq.ids[max(0, a + 1 - cfg.window) : a + 1]
            body = seq.ids[a + 1 : a + 1 + length]
            ok = [True] * len(body) + [False] * (length - len(body))
            body = body + [mask_id] * (length - len(body))
            if t is None:
                m = [True] * length
            else:
                m = [rng.random() < t[k] for _ in range(length)]
                if not any(m):
                    m[rng.randrange(length)] = True
            pad = cfg.window - len(ctx)
            rows.append([model.config.pad_token_id] * pad + ctx + [mask_id if mi else b for mi, b in zip(m, body)])
            masks.append(m)
            labels.append(body)
            valid.append(ok)
        ids = torch.tensor(rows)  # (n, W + B - 1), left-padded windows
        attention = (
            torch.arange(ids.shape[1]).unsqueeze(0)
            >= torch.tensor([cfg.window - min(cfg.window, a + 1) for a in anchors]).unsqueeze(1)
        ).long()
        return ids, attention, torch.tensor(masks), torch.tensor(labels), torch.tensor(valid)

    @staticmethod
    def _forward(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Logits with positions counted from the first real token (as when drafting, unpadded)."""
        ids, attention = ids.to(model.device), attention.to(model.device)
        positions = (attention.cumsum(1) - 1).clamp_min(0)
        return model(input_ids=ids, attention_mask=attention, position_ids=positions).logits

    def loss(self, model, seqs, cfg, rng):
        anchors, owners, ts = [], [], []
        for s in seqs:
            choices = list(range(s.prompt_len - 1, len(s.ids) - 1))
            for a in rng.sample(choices, min(cfg.examples_per_seq, len(choices))):
                anchors.append(a)
                owners.append(s)
                ts.append(cfg.t_min + (1 - cfg.t_min) * rng.random())
        parts = [self._examples(model, s, [a], cfg, [t], rng) for s, a, t in zip(owners, anchors, ts)]
        ids, attention, masked, labels, valid = (torch.cat([p[i] for p in parts]) for i in range(5))
        logits = self._forward(model, ids, attention)[:, cfg.window :]  # (n, B-1, V+1)
        masked, labels, valid = masked.to(logits.device), labels.to(logits.device), valid.to(logits.device)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(
            labels.shape
        )
        w = (masked & valid).float() / torch.tensor(ts, device=logits.device).unsqueeze(1)  # MDLM 1/t weighting
        return (ce * w).sum() / (masked & valid).float().sum().clamp_min(1.0)

    def leading_matches(self, model, seq, anchors, cfg):
        ids, attention, _, labels, valid = self._examples(model, seq, anchors, cfg, None, None)
        logits = self._forward(model, ids, attention)[:, cfg.window :].cpu()
        logits[..., model.config.mask_token_id] = float("-inf")
        correct = (logits.argmax(-1) == labels) & valid
        return _teacher_forced_leading(correct).tolist()


OBJECTIVES: dict[str, type[Objective]] = {"ar": NextTokenObjective, "mdlm": MaskedBlockObjective}


@torch.no_grad()
def token_offline_tau(
    objective: Objective, model: PreTrainedModel, held: list[Sequence], cfg: TokenDrafterConfig, anchors: int = 24
) -> float:
    """1 + mean leading drafts equal to the target's greedy continuation, over held-out greedy
    sequences and blocks with a full continuation (same anchors as the block-diffusion eval)."""
    was_training = model.training
    model.eval()
    rng = random.Random(1234)
    accepted: list[int] = []
    for seq in [s for s in held if s.greedy][: cfg.eval_sequences]:
        choices = [a for a in range(seq.prompt_len - 1, len(seq.ids) - 1) if a + cfg.block_size <= len(seq.ids)]
        if choices:
            accepted += objective.leading_matches(model, seq, rng.sample(choices, min(anchors, len(choices))), cfg)
    model.train(was_training)
    return 1.0 + sum(accepted) / max(1, len(accepted))


class TokenDrafterTask(TrainingTask):
    """A token-only drafter's side of the shared loop: its objective's loss and offline tau."""

    def __init__(
        self,
        objective: Objective,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: TokenDrafterConfig,
        device: torch.device,
    ) -> None:
        self.objective, self.tokenizer, self.cfg, self.device = objective, tokenizer, cfg, device
        self.kind = objective.kind
        self.model = model.to(device=device, dtype=torch.float32)

    def loss(self, seqs: list[Sequence], rng: random.Random) -> torch.Tensor:
        return self.objective.loss(self.model, seqs, self.cfg, rng)

    def evaluate(self, model: torch.nn.Module, seqs: list[Sequence]) -> float:
        return token_offline_tau(self.objective, model, seqs, self.cfg)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        self.objective.save_tokenizer(self.tokenizer, directory)

    def load(self, directory: Path) -> torch.nn.Module:
        return self.objective.load(directory).to(self.device)


def train_token_drafter(
    objective: Objective,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: DataDirs,
    out_dir: str | os.PathLike,
    cfg: TokenDrafterConfig = TokenDrafterConfig(),
    accelerator=None,
    time_budget_s: float | None = None,
    sequences: tuple[list[Sequence], list[Sequence]] | None = None,
) -> Path:
    """Train (or resume) a token-only drafter on the shared loop; returns the best checkpoint's path.
    ``sequences``: (train, held-out) already read from ``data_dir`` by :func:`load_sequences`."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=target.device.type == "cpu")
    torch.manual_seed(cfg.seed)
    check_resume(out_dir, objective.kind, cfg)
    train, held = sequences or load_sequences(data_dir, cfg.max_len, cfg.heldout_mod)
    resume = resume_dir(out_dir)
    model = objective.load(resume) if resume is not None else objective.build(target, tokenizer, cfg)
    task = TokenDrafterTask(objective, model, tokenizer, cfg, acc.device)
    return run_training(task, cfg, train, held, out_dir, accelerator=acc, time_budget_s=time_budget_s)
