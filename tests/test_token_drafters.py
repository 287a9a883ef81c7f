"""Token-only comparison drafters (small AR LM, small MDLM): training on distillation data lowers
the loss, checkpoints load back through ``build_drafter`` as the right drafter kind, and
speculative greedy output with them equals the target's own greedy output."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters import AutoregressiveDrafter, MaskedDiffusionDrafter, build_drafter
from dllm_spec.policy import FixedLength
from dllm_spec.training.token_drafters import OBJECTIVES, TokenDrafterConfig, token_offline_tau, train_token_drafter
from tests.conftest import VOCAB, fake_distill, tiny_llama


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny target's ids (t0 .. t47)."""
    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", pad_token="t1", eos_token="t1", unk_token="t2")


@pytest.mark.slow
@pytest.mark.parametrize("kind,drafter_cls", [("ar", AutoregressiveDrafter), ("mdlm", MaskedDiffusionDrafter)])
def test_token_drafter_training_lowers_the_loss_and_drafts_exactly(target, tmp_path, kind, drafter_cls):
    fake_distill(tmp_path / "data", target)
    cfg = TokenDrafterConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        block_size=6,
        window=24,
        batch_size=4,
        examples_per_seq=6,
        max_steps=60,
        warmup_steps=5,
        eval_every=30,
        checkpoint_every=20,
        eval_sequences=8,
        heldout_mod=6,
        lr=3e-3,
    )
    best = train_token_drafter(OBJECTIVES[kind](), target, tiny_tokenizer(), tmp_path / "data", tmp_path / "run", cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < first * 0.8, (first, last)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["final_heldout_tau"] >= 1.0
    drafter = build_drafter(str(best), target)
    assert isinstance(drafter, drafter_cls)
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5))
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    ref = target.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=1)[0, 8:]
    assert spec.generate(prompt, max_new_tokens=30).token_ids[0].tolist() == ref.tolist()


def test_offline_tau_of_an_ar_drafter_equal_to_the_target_is_the_block_size(target, tmp_path):
    """The target drafting for itself accepts every draft: offline tau = block size (the metric can reach its ceiling)."""
    from dllm_spec.training.sequences import load_sequences

    fake_distill(tmp_path / "data", target)
    cfg = TokenDrafterConfig(block_size=6, heldout_mod=3, eval_sequences=8)
    _, held = load_sequences(tmp_path / "data", cfg.max_len, cfg.heldout_mod)
    assert token_offline_tau(OBJECTIVES["ar"](), target, held, cfg) == pytest.approx(6.0)
    other = tiny_llama(5)
    assert token_offline_tau(OBJECTIVES["ar"](), other, held, cfg) < 3.0
