"""The shared training loop (dllm_spec/training/loop.py) on a toy task: the loss falls, a resumed
run continues the interrupted one step for step, a warm start is scored first and never
regresses, the run directory has one layout, and the schedule follows a time budget."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from dllm_spec.training.loop import TRAINER_STATE, ScheduleConfig, TrainingTask, run_training, warmup_cosine
from dllm_spec.training.sequences import Sequence


class ToyTask(TrainingTask):
    """Fit y = 3x - 1 from each sequence's ids; "tau" is 1 + 1 / (1 + error) on greedy sequences."""

    kind = "toy"

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(1, 1)

    @staticmethod
    def _xy(seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([[float(i) / 10] for s in seqs for i in s.ids])
        return x, 3 * x - 1

    def loss(self, seqs, rng):
        x, y = self._xy(seqs)
        noise = torch.tensor([rng.gauss(0, 0.01) for _ in range(len(x))]).unsqueeze(1)
        return torch.nn.functional.mse_loss(self.model(x), y + noise)

    @torch.no_grad()
    def evaluate(self, model, seqs):
        x, y = self._xy([s for s in seqs if s.greedy])
        return 1.0 + 1.0 / (1.0 + float((model(x) - y).abs().mean()))

    def save(self, model, directory: Path) -> None:
        torch.save(model.state_dict(), directory / "weights.pt")
        (directory / "config.json").write_text(json.dumps({"kind": self.kind}))

    def load(self, directory: Path):
        model = torch.nn.Linear(1, 1)
        model.load_state_dict(torch.load(directory / "weights.pt"))
        return model


def _data(n: int = 40) -> list[Sequence]:
    rng = random.Random(0)
    return [Sequence([rng.randrange(10) for _ in range(rng.randrange(3, 9))], 1, i % 2 == 0) for i in range(n)]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


CFG = ScheduleConfig(
    batch_size=4, max_steps=60, warmup_steps=5, lr=0.3, eval_every=20, checkpoint_every=10, patience=10
)


def test_loss_falls_and_the_run_directory_has_the_shared_layout(tmp_path):
    train, held = _data(), _data(10)
    best = run_training(ToyTask(), CFG, train, held, tmp_path / "run")
    log = _log(tmp_path / "run")
    assert sum(r["loss"] for r in log[-5:]) < 0.2 * sum(r["loss"] for r in log[:5])
    assert [r["step"] for r in log if "heldout_tau" in r] == [20, 40, 60] and all(
        "train_tau" in r for r in log if "heldout_tau" in r
    )
    assert best == tmp_path / "run" / "best" and (best / "config.json").is_file()
    state = torch.load(tmp_path / "run" / "checkpoint" / TRAINER_STATE, weights_only=False)
    assert {"optimizer", "scheduler", "state", "order", "rng"} <= set(state) and state["state"]["step"] == 60
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["drafter"] == "toy" and summary["steps"] == 60
    assert summary["final_heldout_tau"] == pytest.approx(max(r["heldout_tau"] for r in log if "heldout_tau" in r))
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["drafter"] == "toy"


class Killed(Exception):
    pass


def test_a_killed_run_resumes_exactly_where_its_checkpoint_left_it(tmp_path):
    """Killed at step 34 (checkpoints every 10), resumed to 60: the log and the weights equal an
    uninterrupted run's exactly (same data order and random draws; steps 31-33 are done again, once)."""
    train, held = _data(), _data(10)
    whole = ToyTask()
    run_training(whole, CFG, train, held, tmp_path / "whole")
    killed = ToyTask()
    calls = {"n": 0}
    loss = killed.loss

    def dying(seqs, rng):
        calls["n"] += 1
        if calls["n"] == 34:
            raise Killed
        return loss(seqs, rng)

    killed.loss = dying
    with pytest.raises(Killed):
        run_training(killed, CFG, train, held, tmp_path / "split")
    assert _log(tmp_path / "split")[-1]["step"] == 33
    resumed = ToyTask(seed=5)  # other initial weights: the checkpoint's replace them, as a trainer's loading does
    resumed.model.load_state_dict(resumed.load(tmp_path / "split" / "checkpoint").state_dict())
    run_training(resumed, CFG, train, held, tmp_path / "split")
    got, want = _log(tmp_path / "split"), _log(tmp_path / "whole")
    assert [r["step"] for r in got] == list(range(1, 61))  # no step repeated or skipped
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert torch.equal(resumed.model.weight, whole.model.weight) and torch.equal(resumed.model.bias, whole.model.bias)


def test_a_warm_start_is_scored_first_and_best_never_regresses(tmp_path):
    train, held = _data(), _data(10)
    run_training(ToyTask(), CFG, train, held, tmp_path / "run")
    shutil.copytree(tmp_path / "run" / "best", tmp_path / "warm" / "checkpoint")  # weights, no trainer state
    task = ToyTask()
    task.model.load_state_dict(task.load(tmp_path / "warm" / "checkpoint").state_dict())
    harmful = ScheduleConfig(**{**CFG.__dict__, "max_steps": 4, "eval_every": 4, "lr": 50.0, "warmup_steps": 0})
    run_training(task, harmful, train, held, tmp_path / "warm")
    log = _log(tmp_path / "warm")
    incoming = json.loads((tmp_path / "run" / "eval.json").read_text())["final_heldout_tau"]
    assert log[0]["step"] == 0 and log[0]["heldout_tau"] == pytest.approx(incoming)
    assert json.loads((tmp_path / "warm" / "eval.json").read_text())["final_heldout_tau"] >= incoming - 1e-9


def test_patience_stops_a_run_whose_held_out_tau_stops_improving(tmp_path):
    train, held = _data(), _data(10)
    frozen = ScheduleConfig(**{**CFG.__dict__, "lr": 1e-12, "eval_every": 5, "patience": 2, "max_steps": 100})
    run_training(ToyTask(), frozen, train, held, tmp_path / "run")
    assert _log(tmp_path / "run")[-1]["step"] == 15  # best at 5, no gain at 10 and 15


@pytest.mark.parametrize(
    "field,value",
    [("batch_size", 0), ("max_steps", 2.5), ("lr", 0.0), ("lr", float("nan")), ("patience", 0), ("warmup_steps", -1)],
)
def test_bad_schedule_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(**{field: value})


def test_time_budget_paces_the_learning_rate_schedule():
    """With a time budget the cosine decay follows whichever of steps or time is further along."""

    spent = {"fraction": 0.0}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, max_steps=1000, time_fraction=lambda: spent["fraction"])
    for _ in range(3):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] > 0.99  # early in steps and in time: the peak
    spent["fraction"] = 1.0
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.05)  # the budget is spent: the floor


def test_a_resume_with_another_config_is_refused_naming_the_fields(tmp_path):
    """It once resumed silently with the old model shape and schedule and overwrote train_config.json."""
    train, held = _data(), _data(10)
    short = ScheduleConfig(**{**CFG.__dict__, "max_steps": 10})
    run_training(ToyTask(), short, train, held, tmp_path / "run")
    saved = (tmp_path / "run" / "train_config.json").read_text()
    other = ScheduleConfig(**{**short.__dict__, "batch_size": 8, "lr": 0.1})
    with pytest.raises(ValueError, match=r"another config \(batch_size 4 -> 8; lr 0\.3 -> 0\.1\)"):
        run_training(ToyTask(), other, train, held, tmp_path / "run")
    assert (tmp_path / "run" / "train_config.json").read_text() == saved
    longer = ScheduleConfig(**{**short.__dict__, "max_steps": 12, "eval_every": 6})  # going on longer is a resume
    run_training(ToyTask(), longer, train, held, tmp_path / "run")
    assert _log(tmp_path / "run")[-1]["step"] == 12


class NaNTask(ToyTask):
    def evaluate(self, model, seqs):
        return float("nan")


def test_eval_json_never_holds_nan_and_no_held_out_data_is_refused(tmp_path):
    train, held = _data(), _data(10)
    run_training(NaNTask(), ScheduleConfig(**{**CFG.__dict__, "max_steps": 4}), train, held, tmp_path / "run")
    text = (tmp_path / "run" / "eval.json").read_text()
    assert "NaN" not in text and json.loads(text)["final_heldout_tau"] is None
    with pytest.raises(ValueError, match="no greedy held-out sequence"):
        run_training(ToyTask(), CFG, train, [s for s in held if not s.greedy], tmp_path / "other")
    assert not (tmp_path / "other").exists()
