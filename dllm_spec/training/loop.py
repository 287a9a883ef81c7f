"""The one training loop every drafter trainer runs, and its one checkpoint format.

A trainer supplies a :class:`TrainingTask` (its model, loss, offline evaluation and how it saves
a drafter directory); :func:`run_training` does the rest: length-bucketed batches, AdamW with
warm-up + cosine decay (paced by a time budget when there is one), gradient clipping, a bf16
autocast under ``Accelerator(mixed_precision="bf16")``, periodic held-out evaluation of the offline
greedy tau (and the same on training sequences: their gap measures overfitting), early stopping,
and checkpoints. Under ``accelerate launch`` each process takes its share of every batch and the
gradients are averaged across processes before the step; evaluation and writing happen on the
main process.

Run directory (the same for every drafter kind)::

    out/
      train_config.json   the run's config (and the drafter kind)
      train_log.jsonl     one record per step: step, loss, tokens, time_s (+ heldout_tau, train_tau)
      checkpoint/         the latest drafter directory + trainer_state.pt (optimizer, scheduler,
                          counters, data order and random states)
      best/               the drafter directory with the best held-out tau (what to ship)
      eval.json           the best checkpoint's final held-out and train tau, data sizes

Resuming: a ``checkpoint/`` with ``trainer_state.pt`` continues at its step, with the same data
order and random draws as a run that was never stopped (exactly so on one process). A ``checkpoint/`` of
weights only (a drafter directory copied in) is a warm start: its weights are scored first
(step 0 of the log), so ``best/`` never regresses below them. A resume whose config differs from
the run's ``train_config.json`` in anything but :data:`RESUMABLE_FIELDS` (a longer ``max_steps``,
other evaluation or checkpoint intervals) is refused, naming the differing fields: the model
shape and the schedule are the saved run's.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dllm_spec.jsonl import append_record
from dllm_spec.training.sequences import Sequence, length_bucketed_order

TRAINER_STATE = "trainer_state.pt"
#: config fields a resumed run may change (how long it goes on, how often it evaluates and saves)
RESUMABLE_FIELDS = frozenset({"max_steps", "patience", "eval_every", "checkpoint_every", "eval_sequences"})


@dataclass(frozen=True)
class ScheduleConfig:
    """Optimisation and evaluation schedule shared by every trainer's config."""

    batch_size: int = 8
    max_len: int = 448
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup_steps: int = 30
    max_steps: int = 600
    eval_every: int = 50
    eval_sequences: int = 48
    patience: int = 4
    checkpoint_every: int = 25
    heldout_mod: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "max_len",
            "max_steps",
            "eval_every",
            "eval_sequences",
            "patience",
            "checkpoint_every",
            "heldout_mod",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


class TrainingTask(ABC):
    """One drafter kind's side of training."""

    #: short name of the drafter kind (logs, ``train_config.json``)
    kind: str
    #: the trained module (float32, on the accelerator's device)
    model: torch.nn.Module

    @abstractmethod
    def loss(self, seqs: list[Sequence], rng: random.Random) -> torch.Tensor:
        """The training loss of one batch (scalar), with gradients to ``model``."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, seqs: list[Sequence]) -> float:
        """Offline greedy tau of ``model`` on the greedy sequences among ``seqs``: 1 + the mean number
        of leading drafts equal to the target's own continuation."""

    @abstractmethod
    def save(self, model: torch.nn.Module, directory: Path) -> None:
        """Write ``model`` as a drafter directory its drafter class's ``from_pretrained`` loads."""

    @abstractmethod
    def load(self, directory: Path) -> torch.nn.Module:
        """The model saved in ``directory`` (for the final evaluation of ``best/``)."""

    def tokens(self, seqs: list[Sequence]) -> int:
        """Sequence tokens a batch consumes (the x axis of the tau-vs-data curve)."""
        return sum(len(s.ids) for s in seqs)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    max_steps: int,
    time_fraction: Callable[[], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate at ``max_steps``.

    ``time_fraction``: the fraction of a time budget spent (0..1); the decay then follows whichever
    of steps or time is further along, so a run stopped by its budget has annealed too."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction())
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_dir_atomic(out: Path, name: str, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary directory, then replace ``out/name`` with it (a kill never
    leaves a half-written checkpoint under the final name)."""
    tmp = out / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    final = out / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def resume_dir(out: str | os.PathLike) -> Path | None:
    """``out/checkpoint`` when it holds a drafter to resume or warm-start from, else None."""
    path = Path(out) / "checkpoint"
    return path if (path / "config.json").is_file() else None


def check_resume(out: str | os.PathLike, kind: str, cfg: ScheduleConfig) -> None:
    """Refuse to resume ``out`` (a ``checkpoint/`` beside a ``train_config.json``) with a config
    that differs from the saved one outside :data:`RESUMABLE_FIELDS`; the error names the fields."""
    saved_path = Path(out) / "train_config.json"
    if resume_dir(out) is None or not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--out {out}: cannot read {saved_path} of the run to resume ({exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--out {out}: {saved_path} is not a JSON object")
    now = json.loads(json.dumps({"drafter": kind, **asdict(cfg)}))  # as saved (tuples as lists)
    diff = [
        f"{k} {saved[k]!r} -> {v!r}"
        for k, v in now.items()
        if k not in RESUMABLE_FIELDS and k in saved and saved[k] != v
    ]
    if diff:
        raise ValueError(
            f"--out {out} holds a run with another config ({'; '.join(diff)}): resume it with the same "
            "settings, or give a new --out"
        )


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _save(task: TrainingTask, out: Path, name: str, trainer: dict | None = None) -> None:
    def write(tmp: Path) -> None:
        task.save(task.model, tmp)
        if trainer is not None:
            torch.save(trainer, tmp / TRAINER_STATE)

    write_dir_atomic(out, name, write)


def _average_gradients(acc, params: list[torch.nn.Parameter]) -> None:
    """Mean of every gradient over the processes (each computed its share of the batch)."""
    if acc.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = acc.reduce(p.grad, reduction="mean")


def run_training(
    task: TrainingTask,
    cfg: ScheduleConfig,
    train: list[Sequence],
    held: list[Sequence],
    out_dir: str | os.PathLike,
    accelerator=None,
    time_budget_s: float | None = None,
) -> Path:
    """Train ``task.model`` on ``train`` (or resume ``out_dir``); returns the path of ``best/``."""
    from accelerate import Accelerator

    model = task.model
    acc = accelerator or Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    out = Path(out_dir)
    check_resume(out, task.kind, cfg)
    if not any(s.greedy for s in held):
        raise ValueError("no greedy held-out sequence to evaluate on: the offline tau would be undefined")
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    clock = {"start": None}  # set at the first step: a time budget paces the schedule from there

    def time_fraction() -> float:
        return 0.0 if clock["start"] is None else (time.perf_counter() - clock["start"]) / time_budget_s

    run, saved = _start_run(cfg, acc, out, params, time_fraction if time_budget_s else None)
    model.train()
    log = out / "train_log.jsonl"
    if acc.is_main_process:
        _open_run_dir(task, cfg, out, log, run, saved, train, held)
    start = clock["start"] = time.perf_counter()
    bar = tqdm(
        total=cfg.max_steps,
        initial=run.state["step"],
        desc=f"train {task.kind} drafter",
        disable=not acc.is_main_process,
    )
    while run.state["step"] < cfg.max_steps and run.state["bad_evals"] < cfg.patience:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        loss = _train_step(task, acc, params, run, _next_batch(run, train, cfg, acc))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.1e}")
        step = run.state["step"]
        record = {
            "step": step,
            "loss": loss.item(),
            "tokens": run.state["tokens"],
            "time_s": time.perf_counter() - start,
        }
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            _evaluate(task, acc, run, out, train, held, record, bar)
        if acc.is_main_process:
            append_record(log, record)
            if step % cfg.checkpoint_every == 0:
                _save(task, out, "checkpoint", run.trainer_state())
    if acc.is_main_process:
        _finish(task, out, run, train, held, bar)
    acc.wait_for_everyone()
    bar.close()
    return out / "best"


@dataclass
class _Run:
    """A run's progress besides the weights (what ``trainer_state.pt`` holds): the optimiser and its
    schedule, the counters, what is left of the epoch's batch order, and the random states."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: dict
    order: list[int]
    order_rng: random.Random
    rng: random.Random | None = None

    def trainer_state(self) -> dict:
        """Everything a resumed run needs to continue this one exactly (on one process)."""
        return _trainer_state(self.optimizer, self.scheduler, self.state, self.order, self.order_rng, self.rng)


def _start_run(
    cfg: ScheduleConfig,
    acc,
    out: Path,
    params: list[torch.nn.Parameter],
    time_fraction: Callable[[], float] | None,
) -> tuple[_Run, dict | None]:
    """A fresh run, or the one saved in ``out/checkpoint`` continued; returns it and the saved
    trainer state (None when there is none: a fresh run or a warm start)."""
    order_rng = random.Random(cfg.seed)  # the same on every process: they split one batch order
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, time_fraction)
    run = _Run(optimizer, scheduler, {"step": 0, "best_tau": 0.0, "bad_evals": 0, "tokens": 0}, [], order_rng)
    resume = resume_dir(out)
    saved = (
        torch.load(resume / TRAINER_STATE, weights_only=False)
        if resume and (resume / TRAINER_STATE).is_file()
        else None
    )
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        run.state.update({k: v for k, v in saved["state"].items() if k in run.state})
        run.order = list(saved["order"])
        order_rng.setstate(saved["order_rng"])
    # the task's randomness (anchors, noise): per process; the main process continues exactly where it stopped
    run.rng = random.Random(f"{cfg.seed}/{acc.process_index}/{run.state['step']}")
    if saved is not None and acc.is_main_process:
        run.rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
    return run, saved


def _open_run_dir(
    task: TrainingTask,
    cfg: ScheduleConfig,
    out: Path,
    log: Path,
    run: _Run,
    saved: dict | None,
    train: list[Sequence],
    held: list[Sequence],
) -> None:
    """On the main process, before the first step: cut the log back to the checkpoint's step (a
    killed run's later steps are done again), write ``train_config.json``, and score a warm start's
    incoming weights (step 0 of the log) so that ``best/`` never regresses below them."""
    if saved is not None and log.is_file():
        _truncate_log(log, run.state["step"])
    (out / "train_config.json").write_text(json.dumps({"drafter": task.kind, **asdict(cfg)}, indent=1))
    if resume_dir(out) is not None and saved is None:
        tau0 = task.evaluate(task.model, held)
        run.state["best_tau"] = tau0
        _save(task, out, "best")
        append_record(
            log,
            {"step": 0, "tokens": 0, "time_s": 0.0, "heldout_tau": tau0, "train_tau": task.evaluate(task.model, train)},
        )
        tqdm.write(f"warm start: held-out offline tau of the incoming weights {tau0:.3f}")


def _next_batch(run: _Run, train: list[Sequence], cfg: ScheduleConfig, acc) -> list[Sequence]:
    """This process's share of the next batch (a new length-bucketed epoch order when the last runs out)."""
    per_step = cfg.batch_size * acc.num_processes
    if len(run.order) < per_step:
        run.order = length_bucketed_order(train, run.order_rng, chunk=cfg.batch_size)
    take, run.order = run.order[:per_step], run.order[per_step:]
    return [train[i] for i in take[acc.process_index :: acc.num_processes]]


def _train_step(
    task: TrainingTask, acc, params: list[torch.nn.Parameter], run: _Run, seqs: list[Sequence]
) -> torch.Tensor:
    """One optimisation step on ``seqs`` (gradients averaged over processes, clipped); returns the loss."""
    with acc.autocast():  # bf16 under Accelerator(mixed_precision="bf16"), else a no-op
        loss = task.loss(seqs, run.rng)
    acc.backward(loss)
    _average_gradients(acc, params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["step"] += 1
    run.state["tokens"] += task.tokens(seqs) * acc.num_processes
    return loss


def _evaluate(
    task: TrainingTask,
    acc,
    run: _Run,
    out: Path,
    train: list[Sequence],
    held: list[Sequence],
    record: dict,
    bar,
) -> None:
    """The held-out and train offline tau into ``record`` (main process); a new best is saved to
    ``best/``, else it counts towards early stopping, which every process then agrees on."""
    state = run.state
    if acc.is_main_process:
        tau = record["heldout_tau"] = task.evaluate(task.model, held)
        record["train_tau"] = task.evaluate(task.model, train)
        if tau > state["best_tau"]:
            state["best_tau"], state["bad_evals"] = tau, 0
            _save(task, out, "best")
        else:
            state["bad_evals"] += 1
        bar.write(f"step {state['step']}: held-out offline tau {tau:.3f} (best {state['best_tau']:.3f})")
    if acc.num_processes > 1:  # every process stops at the same step
        state["bad_evals"] = int(acc.gather(torch.tensor([state["bad_evals"]], device=acc.device)).max())


def _finish(task: TrainingTask, out: Path, run: _Run, train: list[Sequence], held: list[Sequence], bar) -> None:
    """On the main process, after the last step: the final checkpoint, and ``eval.json`` with the
    best checkpoint's held-out and train tau and the data sizes."""
    _save(task, out, "checkpoint", run.trainer_state())
    if not (out / "best" / "config.json").is_file():
        _save(task, out, "best")
    best = task.load(out / "best")
    final = task.evaluate(best, held)
    summary = {
        "drafter": task.kind,
        "final_heldout_tau": final,
        "final_train_tau": task.evaluate(best, train),
        "steps": run.state["step"],
        "train_tokens_seen": run.state["tokens"],
        "train_sequences": len(train),
        "heldout_sequences": len(held),
        "train_response_tokens": sum(len(s.ids) - s.prompt_len for s in train),
    }
    (out / "eval.json").write_text(json.dumps(_finite(summary), indent=1, allow_nan=False))
    bar.write(f"final held-out offline tau of the best checkpoint: {final:.3f}")


def _truncate_log(log: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (atomically)."""
    kept = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = log.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log)


def _trainer_state(
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    order: list[int],
    order_rng: random.Random,
    rng: random.Random,
) -> dict:
    """Everything a resumed run needs to continue this one exactly (on one process)."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": dict(state),
        "order": list(order),
        "order_rng": order_rng.getstate(),
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
    }
