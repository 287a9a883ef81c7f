"""Training the target-conditioned block-diffusion drafter (the DFlash recipe, adapted; its official
training code was never released).

Per batch of target-generated sequences (prompt + response):
1. the frozen target runs once over every sequence and its hidden states at the drafter's
   ``target_layer_ids`` are cached on disk (:mod:`dllm_spec.training.features`), so epochs,
   evaluations and resumed runs never re-run the target;
2. ``anchors_per_seq`` random anchor positions a are drawn in each response; anchor a's block is
   [token a, MASK x (B-1)] with labels tokens a+1..a+B-1 (same-position labels) and it sees only
   the target features of positions < a (a block-sparse attention mask), like at inference;
3. a mixture of noise levels: with probability ``full_mask_prob`` every block position is masked
   (one-step drafting), otherwise each is masked with probability t ~ U(t_min, 1) and the unmasked
   ones are given (multi-step denoising);
4. cross-entropy on masked positions, weighted exp(-(j-1)/gamma) along the block; optionally
   (``distill_weight`` > 0) mixed with a soft cross-entropy to the target's own top-k next-token
   distribution at that position (cached once, :class:`~dllm_spec.training.features.TeacherStore`):
   on sampled responses the sampled token is a noisy stand-in for what the target prefers, and the
   greedy acceptance test asks exactly for the target's argmax.

AdamW with warm-up + cosine decay, gradient clipping, periodic checkpoints (resume from the latest),
held-out evaluation of the offline greedy tau (leading drafts equal to the target's own greedy
continuation, one denoising step, full block; the same on training sequences, logged as
``train_tau``: their gap measures overfitting), early stopping, and the best checkpoint kept. Runs
unchanged under ``accelerate launch`` (data split across processes, gradients averaged).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dllm_spec.data.distill import iter_shards
from dllm_spec.jsonl import append_record
from dllm_spec.training.common import warmup_cosine, write_dir_atomic
from dllm_spec.training.features import FeatureStore, ResidentStore, TeacherStore, build_stores, feature_dir, teacher_dir
from drafters.base import target_vocab_size
from drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionModel
from drafters.schedulers import ConfidenceUnmaskingScheduler


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (saved beside the checkpoints)."""

    block_size: int = 16
    num_layers: int = 2
    num_target_layers: int = 5
    draft_vocab_size: int = 8192
    anchors_per_seq: int = 16
    batch_size: int = 8
    max_len: int = 448
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup_steps: int = 30
    max_steps: int = 600
    full_mask_prob: float = 0.5
    t_min: float = 0.1
    gamma: float = 7.0
    eval_every: int = 50
    eval_sequences: int = 48
    patience: int = 4
    checkpoint_every: int = 25
    heldout_mod: int = 20
    seed: int = 0
    init_from_target: bool = True
    distill_weight: float = 0.0
    teacher_top_k: int = 8
    max_positions: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "num_layers", "anchors_per_seq", "batch_size", "max_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError("block_size must be >= 2")
        if not 0 <= self.distill_weight <= 1 or self.teacher_top_k < 1:
            raise ValueError(f"distill_weight must be in [0, 1] and teacher_top_k >= 1, got {self.distill_weight}, {self.teacher_top_k}")
        if self.max_positions < 0:
            raise ValueError(f"max_positions must be >= 0 (0: no cap), got {self.max_positions}")
        if not 0 <= self.full_mask_prob <= 1 or not 0 < self.t_min <= 1:
            raise ValueError("full_mask_prob must be in [0, 1] and t_min in (0, 1]")


@dataclass
class Sequence:
    ids: list[int]
    prompt_len: int
    greedy: bool
    shard: str = ""
    row: int = 0


def load_sequences(data_dir: str | os.PathLike, max_len: int, heldout_mod: int) -> tuple[list[Sequence], list[Sequence]]:
    """(train, held-out) sequences from distillation shards; held out by prompt-id hash. Each
    sequence remembers its (shard, row) for the feature cache."""
    train, held = [], []
    for shard, records in iter_shards(data_dir):
        row = 0
        for r in records:
            if not r["response_ids"]:
                continue
            seq = Sequence((r["prompt_ids"] + r["response_ids"])[:max_len], len(r["prompt_ids"]), r["temperature"] == 0, shard, row)
            if seq.prompt_len >= len(seq.ids) - 1:
                continue
            row += 1
            bucket = int(hashlib.sha1(r["prompt_id"].encode()).hexdigest()[:8], 16) % heldout_mod
            (held if bucket == 0 else train).append(seq)
    if not train:
        raise ValueError(f"no training sequences found in {data_dir}")
    return train, held


def cap_positions(train: list[Sequence], max_positions: int, seed: int) -> list[Sequence]:
    """At most ``max_positions`` token positions of ``train`` (0: all): greedy sequences first,
    then sampled ones, each group in a seeded random order. Bounds the memory of resident features
    (~6 KB a position) when the data outgrows the device."""
    if max_positions <= 0 or sum(len(s.ids) for s in train) <= max_positions:
        return train
    rng = random.Random(seed)
    greedy, sampled = [s for s in train if s.greedy], [s for s in train if not s.greedy]
    rng.shuffle(greedy)
    rng.shuffle(sampled)
    kept, total = [], 0
    for seq in greedy + sampled:
        if total + len(seq.ids) <= max_positions:
            kept.append(seq)
            total += len(seq.ids)
    return kept


def build_draft_vocab(sequences: list[Sequence], size: int, always: list[int]) -> torch.Tensor:
    """The ``size`` most frequent response tokens (plus ``always``), sorted target ids."""
    counts = Counter(t for s in sequences for t in s.ids[s.prompt_len:])
    chosen = set(always) | {t for t, _ in counts.most_common(max(0, size - len(always)))}
    return torch.tensor(sorted(chosen), dtype=torch.long)


def draft_vocab_map(vocab: torch.Tensor, size: int) -> torch.Tensor:
    """Target id -> draft id for the sorted draft vocabulary ``vocab`` (-1 outside it): (size,)."""
    mapping = torch.full((size,), -1, dtype=torch.long)
    mapping[vocab] = torch.arange(len(vocab))
    return mapping


def shard_rows(sequences: list[Sequence]) -> dict[str, list[list[int]]]:
    """Token ids of ``sequences`` grouped by shard, in row order (what the feature cache stores).
    Every row of a shard must be present (pass train + held-out): the caches are indexed by row."""
    shards: dict[str, dict[int, list[int]]] = {}
    for s in sequences:
        shards.setdefault(s.shard, {})[s.row] = s.ids
    for name, rows in shards.items():
        if sorted(rows) != list(range(len(rows))):
            raise ValueError(f"shard {name}: rows {sorted(set(range(max(rows) + 1)) - set(rows))[:5]}... are missing; "
                             "the caches are indexed by row, so pass every sequence of the shard")
    return {name: [rows[i] for i in sorted(rows)] for name, rows in sorted(shards.items())}


def sequence_features(store: FeatureStore | ResidentStore, seqs: list[Sequence], device: torch.device | str) -> torch.Tensor:
    """Cached target features of a batch of sequences, right-padded: (N, T, n * H)."""
    return store.batch([(s.shard, s.row) for s in seqs], [len(s.ids) for s in seqs], device)


def block_teacher(store: TeacherStore | ResidentStore, seqs: list[Sequence], batch: "BlockBatch", device: torch.device | str) -> torch.Tensor:
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

    def __init__(self, seqs: list[Sequence], cfg: TrainConfig, vocab_map: torch.Tensor, rng: random.Random, noised: bool = True,
                 anchors: list[list[int]] | None = None) -> None:
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

    def attention_mask(self, width: int, block: int) -> torch.Tensor:
        """(N, 1, A*B, T + A*B) bool: a block sees context keys before its anchor, and its own block."""
        n, A = self.anchor.shape
        ctx = torch.arange(width).view(1, 1, 1, width) < self.anchor.view(n, A, 1, 1)  # (N, A, 1, T)
        ctx = ctx & self.attention.bool().view(n, 1, 1, width)
        ctx = ctx.expand(n, A, block, width).reshape(n, A * block, width)
        blk = torch.block_diag(*[torch.ones(block, block, dtype=torch.bool)] * A).expand(n, -1, -1)
        return torch.cat([ctx, blk], dim=-1).unsqueeze(1)


def block_states(model: BlockDiffusionModel, batch: BlockBatch, features: torch.Tensor, embed: torch.nn.Module,
                 block: int) -> torch.Tensor:
    """Final drafter states of every block body position: (N, A, B-1, H)."""
    n, A = batch.anchor.shape
    width = features.shape[1]
    dev = features.device
    fused = model.fuse_context(features)
    ctx_kv = model.context_kv(fused, torch.arange(width, device=dev).unsqueeze(0))
    first = embed(batch.first_tokens.to(dev)).unsqueeze(2)  # (N, A, 1, H)
    body = torch.where(batch.masked.to(dev).unsqueeze(-1), model.mask_embedding.to(first.dtype),
                       embed(batch.body_tokens.to(dev)))  # (N, A, B-1, H)
    last = fused.gather(1, (batch.anchor.to(dev) - 1).clamp_min(0).unsqueeze(-1).expand(n, A, fused.shape[-1]))  # (N, A, H)
    last = last * (batch.anchor.to(dev) > 0).unsqueeze(-1)  # no context before position 0
    x = model.block_inputs(torch.cat([first, body], dim=2), last).view(n, A * block, -1)  # (N, A, B, H) -> (N, A*B, H)
    mask = batch.attention_mask(width, block).to(dev)
    hidden = model.block_hidden(x, ctx_kv, batch.positions.to(dev), mask).view(n, A, block, -1)
    return hidden[:, :, 1:]


def weighted_loss(states: torch.Tensor, batch: BlockBatch, head: torch.Tensor, gamma: float,
                  teacher: torch.Tensor | None = None, distill_weight: float = 0.0, vocab_map: torch.Tensor | None = None) -> torch.Tensor:
    """Position-decayed cross-entropy over the loss positions only (the LM head, a third of a
    step's compute, runs on those rows alone): weight exp(-(j-1)/gamma) at block position j.

    With ``teacher`` (N, A, L, 2k) from :func:`block_teacher` and ``distill_weight`` w > 0 the
    per-position loss is (1 - w) * CE(label) + w * CE(teacher top-k renormalised over the draft
    vocabulary) (``vocab_map``: target id -> draft id, -1 outside)."""
    n, A, L, _ = states.shape
    dev = states.device
    selected = batch.loss_mask.to(dev)  # (N, A, L)
    w = torch.exp(-torch.arange(L, device=dev, dtype=torch.float32) / gamma).expand(n, A, L)[selected]  # (M,)
    logits = states[selected] @ head.T  # (M, V_draft)
    ce = F.cross_entropy(logits.float(), batch.labels.to(dev)[selected], reduction="none")
    if teacher is not None and distill_weight > 0:
        if vocab_map is None:
            raise ValueError("distillation needs vocab_map (target id -> draft id)")
        k = teacher.shape[-1] // 2
        rows = teacher[selected]  # (M, 2k)
        ids = vocab_map.to(dev)[rows[:, :k].long()]  # (M, k) draft ids, -1 outside the draft vocabulary
        p = torch.where(ids >= 0, rows[:, k:].exp(), torch.zeros_like(rows[:, k:]))
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        logq = torch.log_softmax(logits.float(), dim=-1).gather(1, ids.clamp_min(0))  # (M, k)
        soft = -(p * logq).sum(-1)
        ce = (1 - distill_weight) * ce + distill_weight * soft
    return (ce * w).sum() / w.sum().clamp_min(1e-6)


@torch.no_grad()
def offline_tau(model, target, sequences: list[Sequence], cfg: TrainConfig, head: torch.Tensor, vocab: torch.Tensor,
                store: FeatureStore, anchors: int = 24) -> float:
    """Greedy tau the drafter would reach with one denoising step and a full block, measured on
    held-out greedy sequences (which are the target's own greedy continuations): 1 + mean number
    of leading drafted tokens equal to the continuation."""
    model.eval()
    rng = random.Random(1234)
    seqs = [s for s in sequences if s.greedy][: cfg.eval_sequences]
    if not seqs:
        return float("nan")
    accepted = []
    vocab_map = draft_vocab_map(vocab, target_vocab_size(target))
    ecfg = TrainConfig(**{**asdict(cfg), "anchors_per_seq": anchors})
    for i in range(0, len(seqs), cfg.batch_size):
        chunk = seqs[i: i + cfg.batch_size]
        batch = BlockBatch(chunk, ecfg, vocab_map, rng, noised=False)
        feats = sequence_features(store, chunk, target.device)
        logits = block_states(model, batch, feats, target.get_input_embeddings(), cfg.block_size) @ head.T  # (N, A, B-1, V_draft)
        pred = vocab.to(logits.device)[logits.argmax(-1)]  # (N, A, L) target ids
        match = (pred.cpu() == batch.body_tokens) & batch.label_valid
        full_valid = batch.label_valid.all(-1)  # only blocks with a full continuation
        n_acc = match.long().cumprod(-1).sum(-1)
        accepted += n_acc[full_valid].tolist()
    model.train()
    return 1.0 + sum(accepted) / max(1, len(accepted))


def _save_checkpoint(out: Path, name: str, model: BlockDiffusionModel, extra: dict | None = None, optimizer=None, scheduler=None) -> None:
    """Write ``out/name`` atomically: the drafter, plus the trainer state when an optimizer is given."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # plus the default unmasking schedule, as BlockDiffusionDrafter.save_pretrained writes it
        ConfidenceUnmaskingScheduler(num_inference_steps=model.config.num_inference_steps).save_pretrained(tmp)
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **(extra or {})}, tmp / "trainer_state.pt")

    write_dir_atomic(out, name, write)


def train_block_diffusion(
    target: PreTrainedModel,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    eos_token_id: int | None = None,
    accelerator=None,
    time_budget_s: float | None = None,
    feature_root: str | os.PathLike | None = None,
    resident_features: bool = False,
) -> Path:
    """Train (or resume training) a block-diffusion drafter for ``target``; returns the best checkpoint's path.

    ``feature_root``: where target features are cached (default ``<dllm-spec cache>/features``).
    ``resident_features``: compute the target features (and teacher outputs) once into memory on
    the target's device instead of the disk cache: for GPU runs (~6 KB per token in float16).
    ``time_budget_s``: stop after this many seconds of training; the learning-rate schedule is
    paced by whichever of steps or time runs out first, so a budgeted run still anneals."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=target.device.type == "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed + acc.process_index)
    torch.manual_seed(cfg.seed)
    train, held = load_sequences(data_dir, cfg.max_len, cfg.heldout_mod)
    if len(capped := cap_positions(train, cfg.max_positions, cfg.seed)) < len(train):
        acc.print(f"max_positions {cfg.max_positions}: training on {len(capped)} of {len(train)} sequences")
        train = capped
    resume = out / "checkpoint"
    warm_start = (resume / "config.json").is_file() and not (resume / "trainer_state.pt").is_file()
    if (resume / "config.json").is_file():
        model = BlockDiffusionModel.from_pretrained(resume)
        vocab = model.draft_vocab.clone()
    else:
        vocab = build_draft_vocab(train, cfg.draft_vocab_size, [eos_token_id] if eos_token_id is not None else [])
        mcfg = BlockDiffusionConfig.for_target(target, num_layers=cfg.num_layers, num_target_layers=cfg.num_target_layers,
                                               block_size=cfg.block_size, draft_vocab_size=len(vocab), loss_decay_gamma=cfg.gamma)
        model = BlockDiffusionModel(mcfg)
        model.draft_vocab.copy_(vocab)
        if cfg.init_from_target:
            model.init_from_target(target)
    model.to(dtype=torch.float32).train()
    layer_ids = list(model.config.target_layer_ids)
    if feature_root is None:
        from dllm_spec.target import cache_root

        feature_root = cache_root() / "features"
    store = FeatureStore(feature_dir(feature_root, target, layer_ids), target, layer_ids)
    teachers = None
    if cfg.distill_weight > 0:
        teachers = TeacherStore(teacher_dir(feature_root, target, cfg.teacher_top_k), target, cfg.teacher_top_k)
    if resident_features:  # every process holds its own copy, computed on its own device
        resident = ResidentStore.fill([store] if teachers is None else [store, teachers], shard_rows(train + held),
                                      show_progress=acc.is_main_process)
        store, teachers = resident[0], (resident[1] if teachers is not None else None)
    elif acc.is_main_process:
        build_stores([store] if teachers is None else [store, teachers], shard_rows(train + held))
    acc.wait_for_everyone()
    head = target.get_output_embeddings().weight[vocab].detach()
    embed = target.get_input_embeddings()
    vocab_map = draft_vocab_map(vocab, target_vocab_size(target))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    clock = {"start": None}  # set at the first step: a time budget paces the schedule from there

    def time_fraction() -> float:
        return 0.0 if clock["start"] is None else (time.perf_counter() - clock["start"]) / time_budget_s

    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, time_fraction if time_budget_s else None)
    state = {"step": 0, "best_tau": 0.0, "bad_evals": 0, "tokens": 0}
    if (resume / "trainer_state.pt").is_file():
        saved = torch.load(resume / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update({k: saved[k] for k in state if k in saved})
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    log = out / "train_log.jsonl"
    if warm_start and acc.is_main_process:
        # weights without trainer state (a warm start, e.g. on more data): score them first, so the
        # curve starts from the incoming drafter on this run's held-out set and best/ never regresses
        tau0 = offline_tau(raw, target, held, cfg, head, vocab, store)
        state["best_tau"] = tau0
        _save_checkpoint(out, "best", raw)
        append_record(log, {"step": 0, "tokens": 0, "time_s": 0.0, "heldout_tau": tau0,
                            "train_tau": offline_tau(raw, target, train, cfg, head, vocab, store)})
        tqdm.write(f"warm start: held-out offline tau of the incoming weights {tau0:.3f}")
    start = clock["start"] = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="train drafter", disable=not acc.is_main_process)
    order: list[int] = []
    while state["step"] < cfg.max_steps and state["bad_evals"] < cfg.patience:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        if len(order) < cfg.batch_size * acc.num_processes:
            order = list(range(len(train)))
            rng.shuffle(order)
            order.sort(key=lambda i: len(train[i].ids) // 64)  # bucket by length, shuffled within buckets
            chunks = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            rng.shuffle(chunks)
            order = [i for c in chunks for i in c]
        take = order[: cfg.batch_size * acc.num_processes]
        order = order[len(take):]
        seqs = [train[i] for i in take[acc.process_index:: acc.num_processes]]
        batch = BlockBatch(seqs, cfg, vocab_map, rng)
        feats = sequence_features(store, seqs, acc.device)
        teacher = block_teacher(teachers, seqs, batch, acc.device) if teachers is not None else None
        with acc.autocast():  # bf16 on CPU/GPU under Accelerator(mixed_precision="bf16"), else a no-op
            loss = weighted_loss(block_states(raw, batch, feats, embed, cfg.block_size), batch, head, cfg.gamma,
                                 teacher, cfg.distill_weight, vocab_map)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += int(batch.attention.sum()) * acc.num_processes
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        record = {"step": state["step"], "loss": loss.item(), "tokens": state["tokens"], "time_s": time.perf_counter() - start}
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
            if acc.is_main_process:
                tau = offline_tau(raw, target, held, cfg, head, vocab, store)
                record["heldout_tau"] = tau
                # the same measure on training sequences: the gap to held-out is the overfitting (data-limit) signal
                record["train_tau"] = offline_tau(raw, target, train, cfg, head, vocab, store)
                if tau > state["best_tau"]:
                    state["best_tau"], state["bad_evals"] = tau, 0
                    _save_checkpoint(out, "best", raw)
                else:
                    state["bad_evals"] += 1
                bar.write(f"step {state['step']}: held-out offline tau {tau:.3f} (best {state['best_tau']:.3f})")
            state["bad_evals"] = int(acc.gather(torch.tensor([state["bad_evals"]], device=acc.device)).max()) if acc.num_processes > 1 else state["bad_evals"]
        if acc.is_main_process:
            append_record(log, record)
            if state["step"] % cfg.checkpoint_every == 0:
                _save_checkpoint(out, "checkpoint", raw, state, optimizer, scheduler)
    if acc.is_main_process:
        _save_checkpoint(out, "checkpoint", raw, state, optimizer, scheduler)
        if not (out / "best" / "config.json").is_file():
            _save_checkpoint(out, "best", raw)
        best_model = BlockDiffusionModel.from_pretrained(out / "best").to(acc.device)
        final = offline_tau(best_model, target, held, cfg, head, vocab, store)
        summary = {"final_heldout_tau": final, "final_train_tau": offline_tau(best_model, target, train, cfg, head, vocab, store),
                   "steps": state["step"], "train_tokens_seen": state["tokens"],
                   "train_sequences": len(train), "heldout_sequences": len(held),
                   "train_response_tokens": sum(len(s.ids) - s.prompt_len for s in train)}
        (out / "eval.json").write_text(json.dumps(summary, indent=1))
        bar.write(f"final held-out offline tau of the best checkpoint: {final:.3f}")
    acc.wait_for_everyone()
    bar.close()
    return out / "best"
