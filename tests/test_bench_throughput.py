"""The throughput benchmark (dllm_spec/bench/throughput.py): transformers' batched generate, plain
batched decoding and each variant over batch sizes, its result file and table."""

from __future__ import annotations

import pytest

from dllm_spec.bench.throughput import HF, PLAIN, format_table, run_throughput, summarize, throughput_variants


def test_a_run_over_batch_sizes_reports_every_variant_against_transformers_and_plain(target):
    from dllm_spec import DiffusionSpeculator, SpeculatorConfig
    from dllm_spec.drafters import PromptLookupDrafter
    from dllm_spec.policy import FixedLength
    from tests.conftest import CharTokenizer

    spec = DiffusionSpeculator(
        target, CharTokenizer(), PromptLookupDrafter(), SpeculatorConfig(max_batch_size=4), policy=FixedLength(2)
    )
    variants = throughput_variants(spec, ["default", "prompt-lookup@fixed:3"], "adaptive", 8)
    assert variants["default"] is spec and variants["prompt-lookup@fixed:3"].policy.k == 3
    partial = []
    result = run_throughput(
        spec,
        variants,
        ["abcabcabc", "hello hello", "xyzxyz"],
        [1, 2],
        max_new_tokens=5,
        on_result=lambda r: partial.append(len(r["records"])),
    )
    assert partial == [4, 8]  # after every batch size: transformers, plain and the two variants
    assert list(result["config"]) == [
        "max_new_tokens",
        "repeats",
        "prompts",
        "batch_sizes",
        "dtype",
        "device",
        "threads",
        "kernels",
        "hf_kernels",
        "cpu_flags",
    ]
    assert [r["variant"] for r in result["records"][:4]] == [HF, PLAIN, "default", "prompt-lookup@fixed:3"]
    for rec in result["records"]:
        assert rec["tokens_per_s"] == pytest.approx(rec["new_tokens"] / rec["seconds"])
        assert rec["rows_identical_to_plain"] == 3 or rec["variant"] == HF  # greedy speculation is lossless
    assert set(result["summary"]) == {1, 2} and result["summary"][2][PLAIN]["vs_plain"] == pytest.approx(1.0)
    assert "| 2 | plain |" in format_table(result["summary"], 3)


def test_the_summary_takes_medians_of_per_repeat_ratios():
    rows = [
        dict(repeat=r, batch=4, variant=v, tokens_per_s=tps, tau=tau)
        for r in range(3)
        for v, tps, tau in ((HF, 10.0, None), (PLAIN, 20.0, None), ("x", 40.0 + r, 2.0))
    ]
    m = summarize(rows)[4]["x"]
    assert m["vs_transformers"] == pytest.approx(4.1) and m["vs_plain"] == pytest.approx(2.05) and m["tau"] == 2.0
    assert summarize(rows)[4][HF]["tau"] is None
