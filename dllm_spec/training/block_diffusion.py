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

The examples, forward and loss are in :mod:`dllm_spec.training.block_examples`; optimisation,
evaluation (offline greedy tau: one denoising step, full block), checkpoints, resuming and
``accelerate launch`` are the shared loop of :mod:`dllm_spec.training.loop`. This module holds
the run's config and the :class:`BlockDiffusionTask` that joins them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from dllm_spec.drafters.base import target_vocab_size
from dllm_spec.drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionModel
from dllm_spec.drafters.block_diffusion_model import ARCHITECTURES, target_mismatches
from dllm_spec.drafters.schedulers import ConfidenceUnmaskingScheduler
from dllm_spec.training.block_examples import (
    BlockBatch,
    block_states,
    block_teacher,
    build_draft_vocab,
    draft_vocab_map,
    offline_tau,
    sequence_features,
    weighted_loss,
)
from dllm_spec.training.convert import to_dflash_architecture
from dllm_spec.training.features import (
    FeatureStore,
    ResidentStore,
    TeacherStore,
    build_stores,
    feature_dir,
    teacher_dir,
)
from dllm_spec.training.loop import TRAINER_STATE, ScheduleConfig, TrainingTask, check_resume, resume_dir, run_training
from dllm_spec.training.sequences import DataDirs, Sequence, cap_positions, has_gaps, load_sequences, shard_rows


@dataclass(frozen=True)
class TrainConfig(ScheduleConfig):
    """Drafter shape, examples and loss of one block-diffusion training run (the schedule fields
    come from :class:`~dllm_spec.training.loop.ScheduleConfig`; saved beside the checkpoints)."""

    block_size: int = 16
    num_layers: int = 2
    num_target_layers: int = 5
    draft_vocab_size: int = 8192  # 0: the full target vocabulary (what transformers and z-lab's DFlash need)
    anchors_per_seq: int = 16
    full_mask_prob: float = 0.5
    t_min: float = 0.1
    gamma: float = 7.0
    init_from_target: bool = True
    distill_weight: float = 0.0
    teacher_top_k: int = 8
    max_positions: int = 0
    architecture: str = "dllm"
    mask_token_id: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.mask_token_id < -1:
            raise ValueError(f"mask_token_id must be a target token id, or -1 to choose one, got {self.mask_token_id}")
        for name in ("block_size", "num_layers", "num_target_layers", "anchors_per_seq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError("block_size must be >= 2")
        if not 0 <= self.distill_weight <= 1 or self.teacher_top_k < 1:
            raise ValueError(
                f"distill_weight must be in [0, 1] and teacher_top_k >= 1, got {self.distill_weight}, {self.teacher_top_k}"
            )
        if self.max_positions < 0:
            raise ValueError(f"max_positions must be >= 0 (0: no cap), got {self.max_positions}")
        if not 0 <= self.full_mask_prob <= 1 or not 0 < self.t_min <= 1:
            raise ValueError("full_mask_prob must be in [0, 1] and t_min in (0, 1]")


class BlockDiffusionTask(TrainingTask):
    """The block-diffusion drafter's side of the loop: cached target features in, anchored blocks,
    the decayed (distilled) loss, offline tau through the target's LM head."""

    kind = "block-diffusion"

    def __init__(
        self,
        model: BlockDiffusionModel,
        target: PreTrainedModel,
        cfg: TrainConfig,
        store: FeatureStore | ResidentStore,
        teachers: TeacherStore | ResidentStore | None,
        device: torch.device,
    ) -> None:
        self.model = model.to(device=device, dtype=torch.float32)
        self.target, self.cfg, self.store, self.teachers, self.device = target, cfg, store, teachers, device
        # target ids of the draft vocabulary; the full target vocabulary when the drafter has none
        self.vocab = model.draft_vocab.clone() if model.draft_vocab.numel() else torch.arange(target_vocab_size(target))
        self.head = target.get_output_embeddings().weight[self.vocab].detach()  # (V_draft, H)
        self.embed = target.get_input_embeddings()
        self.vocab_map = draft_vocab_map(self.vocab, target_vocab_size(target))

    def loss(self, seqs: list[Sequence], rng: random.Random) -> torch.Tensor:
        batch = BlockBatch(seqs, self.cfg, self.vocab_map, rng)
        feats = sequence_features(self.store, seqs, self.device)
        teacher = block_teacher(self.teachers, seqs, batch, self.device) if self.teachers is not None else None
        states = block_states(self.model, batch, feats, self.embed, self.cfg.block_size)
        return weighted_loss(
            states, batch, self.head, self.cfg.gamma, teacher, self.cfg.distill_weight, self.vocab_map, batch.on_policy
        )

    def evaluate(self, model: torch.nn.Module, seqs: list[Sequence]) -> float:
        return offline_tau(model, self.target, seqs, self.cfg, self.head, self.vocab, self.store)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(
            directory
        )  # plus the default unmasking schedule, as BlockDiffusionDrafter.save_pretrained writes it
        ConfidenceUnmaskingScheduler(num_inference_steps=model.config.num_inference_steps).save_pretrained(directory)

    def load(self, directory: Path) -> torch.nn.Module:
        return BlockDiffusionModel.from_pretrained(directory).to(self.device)


def rarest_token(sequences: list[Sequence], vocab_size: int) -> int:
    """The target token that occurs least in ``sequences`` (ties: the lowest id): the mask id of a
    fresh dflash drafter, so the mask is a token the drafter almost never sees as text."""
    counts = torch.bincount(torch.tensor([t for s in sequences for t in s.ids]), minlength=vocab_size)
    return int(counts.argmin())


def _feature_sample(store, train: list[Sequence], device, n: int = 16) -> torch.Tensor:
    """Target features of the first ``n`` training sequences' positions: (positions, width)."""
    seqs = train[:n]
    feats = store.batch([(s.shard, s.row) for s in seqs], [len(s.ids) for s in seqs], device)  # (n, T, width)
    valid = (
        torch.arange(feats.shape[1], device=feats.device)[None, :]
        < torch.tensor([len(s.ids) for s in seqs], device=feats.device)[:, None]
    )
    return feats[valid]


def _initial_model(
    cfg: TrainConfig,
    target: PreTrainedModel,
    incoming: BlockDiffusionModel | None,
    resume: Path | None,
    train: list[Sequence],
    store,
    eos_token_id: int | None,
    acc,
) -> BlockDiffusionModel:
    """The weights a run starts from: ``incoming`` (resumed or warm-started; converted when it has
    the other architecture) or a fresh drafter initialised from the target."""
    if incoming is not None and incoming.config.architecture != cfg.architecture:
        if cfg.architecture != "dflash":
            raise ValueError(
                f"{resume}: cannot warm-start a {cfg.architecture!r} drafter from a {incoming.config.architecture!r} one"
            )
        if (resume / TRAINER_STATE).is_file():
            raise ValueError(
                f"{resume} is a {incoming.config.architecture!r} run to resume; warm-start a new run directory instead"
            )
        acc.print(
            f"warm start: converting the {incoming.config.architecture!r} drafter in {resume} to the dflash architecture"
        )
        sample = _feature_sample(store, train, device=target.device)
        embed = target.get_input_embeddings().weight.detach()
        incoming = to_dflash_architecture(incoming, embed, sample, None if cfg.mask_token_id < 0 else cfg.mask_token_id)
    if incoming is not None:
        return incoming
    always = [eos_token_id] if eos_token_id is not None else []
    vocab = (
        build_draft_vocab(train, cfg.draft_vocab_size, always)
        if cfg.draft_vocab_size
        else torch.zeros(0, dtype=torch.long)
    )
    dflash = cfg.architecture == "dflash"
    mask_id = (
        (cfg.mask_token_id if cfg.mask_token_id >= 0 else rarest_token(train, target_vocab_size(target)))
        if dflash
        else None
    )
    mcfg = BlockDiffusionConfig.for_target(
        target,
        num_layers=cfg.num_layers,
        num_target_layers=cfg.num_target_layers,
        block_size=cfg.block_size,
        draft_vocab_size=len(vocab),
        loss_decay_gamma=cfg.gamma,
        architecture=cfg.architecture,
        mask_token_id=mask_id,
    )
    model = BlockDiffusionModel(mcfg)
    model.draft_vocab.copy_(vocab)
    if cfg.init_from_target:
        model.init_from_target(target)
    model.calibrate_feature_scale(_feature_sample(store, train, device=target.device))
    return model


def train_block_diffusion(
    target: PreTrainedModel,
    data_dir: DataDirs,
    out_dir: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    eos_token_id: int | None = None,
    accelerator=None,
    time_budget_s: float | None = None,
    feature_root: str | os.PathLike | None = None,
    resident_features: bool = False,
    sequences: tuple[list[Sequence], list[Sequence]] | None = None,
) -> Path:
    """Train (or resume training) a block-diffusion drafter for ``target``; returns the best checkpoint's path.

    ``feature_root``: where target features are cached (default ``<dllm-spec cache>/features``).
    ``resident_features``: compute the target features (and teacher outputs) once into memory on
    the target's device instead of the disk cache: for GPU runs (~6 KB per token in float16).
    ``time_budget_s``: stop after this many seconds of training; the learning-rate schedule is
    paced by whichever of steps or time runs out first, so a budgeted run still anneals.
    ``cfg.architecture="dflash"`` trains the layout DFlash consumers load; a ``"dllm"`` drafter
    copied into ``out_dir/checkpoint`` is then converted first (:mod:`dllm_spec.training.convert`).
    ``sequences``: (train, held-out) already read from ``data_dir`` by :func:`load_sequences`."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=target.device.type == "cpu")
    torch.manual_seed(cfg.seed)
    check_resume(out_dir, BlockDiffusionTask.kind, cfg)
    train, held = sequences or load_sequences(data_dir, cfg.max_len, cfg.heldout_mod)
    capped = cap_positions(train, cfg.max_positions, cfg.seed)
    if len(capped) < len(train):  # the caches then hold only the kept sequences' rows
        acc.print(f"max_positions {cfg.max_positions}: training on {len(capped)} of {len(train)} sequences")
        train = capped
    resume = resume_dir(out_dir)
    incoming = BlockDiffusionModel.from_pretrained(resume) if resume is not None else None
    problems = target_mismatches(incoming.config, target) if incoming is not None else []
    if problems:  # e.g. the shipped SmolLM2 drafter copied in as a warm start for another target
        raise ValueError(
            f"{resume}: the drafter there was built for another target ({'; '.join(problems)}); "
            "train a fresh drafter for this target in a new run directory"
        )
    if incoming is not None:
        layer_ids = list(incoming.config.target_layer_ids)
    else:
        layer_ids = list(
            BlockDiffusionConfig.for_target(target, num_target_layers=cfg.num_target_layers).target_layer_ids
        )
    if feature_root is None:
        from dllm_spec.target import cache_root

        feature_root = cache_root() / "features"
    store = FeatureStore(feature_dir(feature_root, target, layer_ids), target, layer_ids)
    gaps = has_gaps(train + held)
    bf16 = acc.mixed_precision == "bf16"  # the feature pass under the same autocast as the drafter
    teachers = None
    if cfg.distill_weight > 0 or not all(s.on_policy for s in train):  # off-policy text learns the target's labels
        teachers = TeacherStore(teacher_dir(feature_root, target, cfg.teacher_top_k), target, cfg.teacher_top_k)
    if resident_features:  # every process holds its own copy, computed on its own device
        resident = ResidentStore.fill(
            [store] if teachers is None else [store, teachers],
            shard_rows(train + held, gaps),
            show_progress=acc.is_main_process,
            bf16=bf16,
        )
        store, teachers = resident[0], (resident[1] if teachers is not None else None)
    elif acc.is_main_process:
        build_stores([store] if teachers is None else [store, teachers], shard_rows(train + held, gaps), bf16=bf16)
    acc.wait_for_everyone()
    model = _initial_model(cfg, target, incoming, resume, train, store, eos_token_id, acc)
    task = BlockDiffusionTask(model, target, cfg, store, teachers, acc.device)
    return run_training(task, cfg, train, held, out_dir, accelerator=acc, time_budget_s=time_budget_s)
