"""Training curves (dllm_spec/training/curves.py)."""

from __future__ import annotations

import json

import pytest


def test_training_curve_reads_evaluations_and_shifts_warm_started_runs(tmp_path):
    from dllm_spec.training.curves import heldout_points, main

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 1, "loss": 3.0, "tokens": 100},
                {"step": 2, "loss": 2.5, "tokens": 200, "heldout_tau": 1.2},
                {"step": 3, "loss": 2.0, "tokens": 300, "heldout_tau": 1.3},
            ]
        )
        + "\n"
    )
    assert heldout_points(run / "train_log.jsonl") == [(200, 1.2), (300, 1.3)]
    main([f"a={run}", "--offset", "a=1e6", "--break-even", "2.2", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main([f"a={run}", "--offset", "b=5", "--out", str(tmp_path / "d.png")])
