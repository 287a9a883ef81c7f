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
  t ~ U(t_min, 1) (at least one), exactly how :class:`drafters.MaskedDiffusionDrafter` drafts;
  loss on masked positions, weighted 1/t (MDLM). Offline tau: one denoising step, full block.

Checkpoints (``checkpoint/`` to resume, ``best/`` by held-out tau) are plain transformers
directories with the tokenizer, loadable by ``AutoregressiveDrafter.from_pretrained`` /
``MaskedDiffusionDrafter.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
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

from dllm_spec.jsonl import append_record
from dllm_spec.training.block_diffusion import Sequence, load_sequences
from dllm_spec.training.common import warmup_cosine, write_dir_atomic
from drafters.base import target_vocab_size

MASK_TOKEN = "<|mask|>"


@dataclass(frozen=True)
class TokenDrafterConfig:
    """Size and training hyper-parameters of a token-only drafter."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    block_size: int = 16
    window: int = 64
    batch_size: int = 8
    examples_per_seq: int = 4
    max_len: int = 448
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 400
    t_min: float = 0.1
    eval_every: int = 50
    eval_sequences: int = 48
    checkpoint_every: int = 25
    heldout_mod: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "window", "batch_size", "examples_per_seq",
                     "max_steps", "eval_every", "checkpoint_every"):
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
    emb = target.get_input_embeddings().weight.detach().float()  # (V, H)
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
    def build(self, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: TokenDrafterConfig) -> PreTrainedModel: ...

    @abstractmethod
    def load(self, path: Path) -> PreTrainedModel: ...

    @abstractmethod
    def loss(self, model: PreTrainedModel, seqs: list[Sequence], cfg: TokenDrafterConfig, rng: random.Random) -> torch.Tensor: ...

    @abstractmethod
    def leading_matches(self, model: PreTrainedModel, seq: Sequence, anchors: list[int], cfg: TokenDrafterConfig) -> list[int]: ...

    def save_tokenizer(self, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
        tokenizer.save_pretrained(path)


class NextTokenObjective(Objective):
    """A small causal LM drafting token by token (the standard speculative-decoding drafter)."""

    kind = "ar"

    def build(self, target, tokenizer, cfg):
        vocab = target_vocab_size(target)
        config = LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                             max_position_embeddings=max(2048, cfg.max_len), tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
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
            labels[i, s.prompt_len: len(s.ids)] = torch.tensor(s.ids[s.prompt_len:])  # response tokens only
        return ids, attention, labels

    def loss(self, model, seqs, cfg, rng):
        ids, attention, labels = self._batch(seqs)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # (N, T-1, V): position i predicts i+1
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    def leading_matches(self, model, seq, anchors, cfg):
        ids = torch.tensor([seq.ids])
        pred = model(input_ids=ids).logits[0].argmax(-1)  # (T,): position i predicts token i+1
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
        config = BertConfig(vocab_size=vocab + 1, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            max_position_embeddings=cfg.window + cfg.block_size, type_vocab_size=1, mask_token_id=vocab,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                            tie_word_embeddings=True)
        config.draft_window, config.draft_block_size = cfg.window, cfg.block_size - 1  # masks drafted; read by MaskedDiffusionDrafter.from_pretrained
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
    def _examples(model, seq: Sequence, anchors: list[int], cfg: TokenDrafterConfig, t: list[float] | None, rng: random.Random | None):
        """(ids (n, W+B-1), masked (n, B-1), labels (n, B-1), valid (n, B-1)) for anchors a: the
        window ending at token a, then the block body a+1..a+B-1 (masked where drawn)."""
        mask_id, length = int(model.config.mask_token_id), cfg.block_size - 1
        rows, masks, labels, valid = [], [], [], []
        for k, a in enumerate(anchors):
            ctx = seq.ids[max(0, a + 1 - cfg.window): a + 1]
            body = seq.ids[a + 1: a + 1 + length]
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
        attention = (torch.arange(ids.shape[1]).unsqueeze(0) >= torch.tensor([cfg.window - min(cfg.window, a + 1) for a in anchors]).unsqueeze(1)).long()
        return ids, attention, torch.tensor(masks), torch.tensor(labels), torch.tensor(valid)

    @staticmethod
    def _forward(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Logits with positions counted from the first real token (as when drafting, unpadded)."""
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
        logits = self._forward(model, ids, attention)[:, cfg.window:]  # (n, B-1, V+1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)
        w = (masked & valid).float() / torch.tensor(ts).unsqueeze(1)  # MDLM 1/t weighting
        return (ce * w).sum() / (masked & valid).float().sum().clamp_min(1.0)

    def leading_matches(self, model, seq, anchors, cfg):
        ids, attention, _, labels, valid = self._examples(model, seq, anchors, cfg, None, None)
        logits = self._forward(model, ids, attention)[:, cfg.window:]
        logits[..., model.config.mask_token_id] = float("-inf")
        correct = (logits.argmax(-1) == labels) & valid
        return _teacher_forced_leading(correct).tolist()


OBJECTIVES: dict[str, type[Objective]] = {"ar": NextTokenObjective, "mdlm": MaskedBlockObjective}


@torch.no_grad()
def token_offline_tau(objective: Objective, model: PreTrainedModel, held: list[Sequence], cfg: TokenDrafterConfig, anchors: int = 24) -> float:
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


def _save(model: PreTrainedModel, objective: Objective, tokenizer, out: Path, name: str, trainer: dict | None = None) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        objective.save_tokenizer(tokenizer, tmp)
        if trainer is not None:
            torch.save(trainer, tmp / "trainer_state.pt")

    write_dir_atomic(out, name, write)


def train_token_drafter(
    objective: Objective,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TokenDrafterConfig = TokenDrafterConfig(),
    time_budget_s: float | None = None,
) -> Path:
    """Train (or resume) a token-only drafter; returns the best checkpoint's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    train, held = load_sequences(data_dir, cfg.max_len, cfg.heldout_mod)
    resume = out / "checkpoint"
    model = objective.load(resume) if (resume / "config.json").is_file() else objective.build(target, tokenizer, cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps)
    state = {"step": 0, "best_tau": 0.0, "tokens": 0}
    if (resume / "trainer_state.pt").is_file():
        saved = torch.load(resume / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update(saved["state"])
    (out / "train_config.json").write_text(json.dumps({"objective": objective.kind, **asdict(cfg)}, indent=1))
    log = out / "train_log.jsonl"
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=f"train {objective.kind} drafter")
    order: list[int] = []
    while state["step"] < cfg.max_steps:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        if len(order) < cfg.batch_size:
            order = list(range(len(train)))
            rng.shuffle(order)
        seqs = [train[i] for i in order[: cfg.batch_size]]
        order = order[cfg.batch_size:]
        loss = objective.loss(model, seqs, cfg, rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += sum(len(s.ids) for s in seqs)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"step": state["step"], "loss": loss.item(), "tokens": state["tokens"], "time_s": time.perf_counter() - start}
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
            tau = token_offline_tau(objective, model, held, cfg)
            record["heldout_tau"] = tau
            if tau > state["best_tau"]:
                state["best_tau"] = tau
                _save(model, objective, tokenizer, out, "best")
            bar.write(f"step {state['step']}: held-out offline tau {tau:.3f} (best {state['best_tau']:.3f})")
        append_record(log, record)
        if state["step"] % cfg.checkpoint_every == 0:
            _save(model, objective, tokenizer, out, "checkpoint",
                  {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state})
    _save(model, objective, tokenizer, out, "checkpoint", {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state})
    if not (out / "best" / "config.json").is_file():
        _save(model, objective, tokenizer, out, "best")
    final = token_offline_tau(objective, objective.load(out / "best"), held, cfg)
    summary = {"objective": objective.kind, "final_heldout_tau": final, "steps": state["step"], "train_tokens_seen": state["tokens"],
               "train_sequences": len(train), "heldout_sequences": len(held)}
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    bar.write(f"final held-out offline tau of the best {objective.kind} checkpoint: {final:.3f}")
    bar.close()
    return out / "best"
