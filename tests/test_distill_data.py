"""Self-distillation data: resumable generation (each (prompt, variant) exactly once, greedy records
are the target's own greedy output, new temperatures append as new variants) and the prompt set
(growing it keeps the original order and the benchmark's held-out prompts)."""

from __future__ import annotations

import pytest
import torch

from dllm_spec.data.distill import DistillConfig, generate_distillation_data, iter_shards, read_shards
from dllm_spec.data.prompts import (
    HELDOUT_SUBJECTS_FILE,
    Prompt,
    build_prompts,
    heldout_prompts,
    heldout_subjects,
    prompt_subject,
    training_prompts,
)
from tests.conftest import VOCAB, CharTokenizer

PROMPTS = [Prompt(f"p{i}", "chat", "hello " * (1 + i % 3) + str(i)) for i in range(6)]


def _keys(directory) -> list[tuple[str, int]]:
    return [(r["prompt_id"], r["variant"]) for r in read_shards(directory)]


def test_a_stopped_run_resumes_without_repeating_or_losing_a_response(target, tmp_path):
    config = DistillConfig(temperatures=(0.0, 0.8), max_new_tokens=5, batch_size=4, shard_size=4)
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path, config, max_shards=1)
    assert len(_keys(tmp_path)) == 4
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path, config)
    keys = _keys(tmp_path)
    assert sorted(keys) == sorted((p.id, v) for p in PROMPTS for v in (0, 1))
    assert len(keys) == len(set(keys))


def test_greedy_variants_come_first_and_equal_the_targets_greedy_output(target, tmp_path):
    config = DistillConfig(temperatures=(0.0, 0.8), max_new_tokens=6, batch_size=3, shard_size=6)
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path, config)
    shards = list(iter_shards(tmp_path))
    assert {r["variant"] for r in shards[0][1]} == {0}  # variant by variant: every greedy response first
    for record in shards[0][1]:
        ids = torch.tensor([record["prompt_ids"]])
        expected = target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1)[0, ids.shape[1]:]
        assert record["response_ids"] == expected.tolist()


def test_an_appended_temperature_adds_only_the_new_variant(target, tmp_path):
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path,
                               DistillConfig(temperatures=(0.0,), max_new_tokens=4, batch_size=6, shard_size=6))
    before = _keys(tmp_path)
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS, tmp_path,
                               DistillConfig(temperatures=(0.0, 1.0), max_new_tokens=4, batch_size=6, shard_size=6))
    added = _keys(tmp_path)[len(before):]
    assert sorted(added) == sorted((p.id, 1) for p in PROMPTS)
    assert {r["temperature"] for r in read_shards(tmp_path) if r["variant"] == 1} == {1.0}


def test_a_rerun_that_changes_a_stored_variants_temperature_is_refused(target, tmp_path):
    generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS[:2], tmp_path,
                               DistillConfig(temperatures=(0.0, 0.8), max_new_tokens=3, batch_size=4, shard_size=4))
    with pytest.raises(ValueError, match="variant 1 at temperature 0.8"):
        generate_distillation_data(target, CharTokenizer(eos_token_id=VOCAB - 1), PROMPTS[:2], tmp_path,
                                   DistillConfig(temperatures=(0.0, 0.7), max_new_tokens=3))


def test_growing_the_prompt_set_keeps_the_original_order_and_the_benchmark_prompts():
    base = build_prompts(extended=False)
    full = build_prompts()
    assert [p.id for p in full[: len(base)]] == [p.id for p in base]
    assert len(full) > len(base) and len({p.id for p in full}) == len(full)
    assert {p.category for p in full[len(base):]} == {"docs"}
    held = heldout_prompts(per_category=4)
    assert all(p.split == "heldout" for p in held)
    assert {p.id for p in held} <= {p.id for p in base}


def test_no_training_prompt_documents_a_held_out_subject(tmp_path):
    prompts = build_prompts()
    train = training_prompts()
    held = heldout_subjects(prompts)
    assert train and all(p.split == "train" and prompt_subject(p) not in held for p in train)
    # A subject listed by another machine (the committed list) is excluded too.
    victim = next(p for p in train if prompt_subject(p))
    listed = tmp_path / "subjects.txt"
    listed.write_text(prompt_subject(victim) + "\n")
    assert prompt_subject(victim) in heldout_subjects(prompts, listed)
    assert prompt_subject(victim) not in heldout_subjects(prompts, None)


def test_the_committed_subject_list_covers_the_benchmark_prompts():
    listed = set(HELDOUT_SUBJECTS_FILE.read_text().split())
    subjects = {prompt_subject(p) for p in heldout_prompts(per_category=4) if p.category == "docs"}
    assert subjects and subjects <= listed


def test_the_prompt_set_does_not_depend_on_what_was_imported_before():
    import subprocess
    import sys

    code = "from dllm_spec.data.prompts import build_prompts; print(','.join(p.id for p in build_prompts()))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    assert fresh.split(",") == [p.id for p in build_prompts()]
