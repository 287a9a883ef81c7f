"""DFlash checkpoint layouts (drafters/dflash_format.py): an exported drafter loaded by transformers'
own ``MuseGlimmerAssistantModel`` gives our block logits and drafts inside transformers'
``generate(speculation_type="dflash")`` with greedy output equal to plain greedy; export -> import
gives identical drafts; a checkpoint written in z-lab's layout loads and drafts; what cannot be
represented is refused, naming why."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, BlockDiffusionModel
from dllm_spec.drafters.dflash_format import checkpoint_layout, export_blockers, load_dflash, save_dflash
from dllm_spec.policy import FixedLength
from dllm_spec.training.features import compute_features
from dllm_spec.verify.sampling import SamplingParams
from tests.conftest import VOCAB, begin, make_drafter, propose, tiny_llama

MASK = VOCAB - 1


def dflash_drafter(target, draft_vocab: int = 0, seed: int = 0) -> BlockDiffusionDrafter:
    """A random dflash-architecture drafter with non-trivial norms and feature scale."""
    torch.manual_seed(seed)
    cfg = BlockDiffusionConfig.for_target(
        target,
        num_layers=2,
        num_target_layers=2,
        block_size=6,
        architecture="dflash",
        mask_token_id=MASK,
        draft_vocab_size=draft_vocab,
    )
    model = BlockDiffusionModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms: away from ones, so a dropped or misplaced norm shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
        model.feature_scale.copy_(torch.rand_like(model.feature_scale) + 0.5)
        if draft_vocab:
            model.draft_vocab.copy_(torch.arange(0, 2 * draft_vocab, 2))
    return BlockDiffusionDrafter(model)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0, layers=4)


def our_block_logits(drafter: BlockDiffusionDrafter, target, ids: list[int]) -> torch.Tensor:
    """Logits (B-1, V) of one full block after context ``ids[:-1]``, from the drafter's own network."""
    model = drafter.model
    n = len(ids) - 1
    feats = compute_features(
        target, torch.tensor([ids[:-1]]), torch.ones(1, n, dtype=torch.long), list(model.config.target_layer_ids)
    )
    fused = model.fuse_context(feats)
    ctx_kv = model.context_kv(fused, torch.arange(n).unsqueeze(0))
    embed = target.get_input_embeddings()
    block = torch.tensor([[ids[-1]] + [MASK] * (model.config.block_size - 1)])
    positions = torch.arange(n, n + model.config.block_size).unsqueeze(0)
    hidden = model.block_hidden(embed(block), ctx_kv, positions, None)  # (1, B, H)
    return hidden[0, 1:] @ target.get_output_embeddings().weight.T


def test_exported_drafter_in_transformers_own_class_gives_our_block_logits(target, tmp_path):
    from transformers import AutoModel, MuseGlimmerAssistantModel

    drafter = dflash_drafter(target)
    save_dflash(drafter.model, tmp_path / "tf", "transformers")
    theirs = AutoModel.from_pretrained(tmp_path / "tf", dtype=torch.float32).eval()
    assert isinstance(theirs, MuseGlimmerAssistantModel)
    assert theirs.config.target_layer_ids == [
        i - 1 for i in drafter.config.target_layer_ids
    ]  # they read hidden_states[i + 1]
    ids = [0, 5, 9, 14, 5, 9, 22, 7, 31, 3]
    n = len(ids) - 1
    with torch.no_grad():
        out = target(torch.tensor([ids[:-1]]), output_hidden_states=True)
        context = torch.cat([out.hidden_states[i + 1] for i in theirs.config.target_layer_ids], dim=-1)
        noise = target.get_input_embeddings()(torch.tensor([[ids[-1]] + [MASK] * 5]))
        hidden = theirs(
            noise_embeds=noise, context_hidden_states=context, position_ids=torch.arange(n + 6).unsqueeze(0)
        ).last_hidden_state
        want = hidden[0, 1:] @ target.get_output_embeddings().weight.T
        got = our_block_logits(drafter, target, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt", [[0, 5, 9, 14, 5, 9, 22, 7], [0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
def test_exported_drafter_drafts_in_transformers_generate_with_greedy_output_unchanged(target, tmp_path, prompt):
    from transformers import AutoModel

    save_dflash(dflash_drafter(target).model, tmp_path / "tf", "transformers")
    assistant = AutoModel.from_pretrained(tmp_path / "tf", dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    ref = target.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=1)
    got = target.generate(
        ids, max_new_tokens=30, do_sample=False, pad_token_id=1, assistant_model=assistant, speculation_type="dflash"
    )
    assert got.tolist() == ref.tolist()


def test_export_then_import_gives_identical_drafts_in_both_layouts(target, tmp_path):
    drafter = dflash_drafter(target)
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5))
    ids = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    feats = compute_features(target, ids, torch.ones_like(ids), list(drafter.target_layer_ids))
    begin(drafter, ids, feats[:, :-1])
    want = propose(drafter, ids, 5, SamplingParams(), None)
    for layout in ("dflash", "transformers"):
        drafter.export(tmp_path / layout, layout)
        assert checkpoint_layout(tmp_path / layout) == layout
        back = BlockDiffusionDrafter.from_pretrained(tmp_path / layout)
        DiffusionSpeculator(target, None, back)
        begin(back, ids, feats[:, :-1])
        got = propose(back, ids, 5, SamplingParams(), None)
        assert got.tokens.tolist() == want.tokens.tolist()
        torch.testing.assert_close(got.confidence, want.confidence, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            back.model.fuse.weight, drafter.model.fuse.weight * drafter.model.feature_scale, rtol=1e-6, atol=1e-6
        )
    ref = target.generate(ids, max_new_tokens=25, do_sample=False, pad_token_id=1)[0, 8:]
    assert spec.generate(ids, max_new_tokens=25).token_ids[0].tolist() == ref.tolist()


def test_a_reduced_vocabulary_exports_as_vllm_d2t_and_round_trips(target, tmp_path):
    drafter = dflash_drafter(target, draft_vocab=12)
    DiffusionSpeculator(target, None, drafter)
    drafter.export(tmp_path / "vllm", "dflash")
    meta = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert meta["draft_vocab_size"] == 12 and meta["vocab_size"] == VOCAB
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "vllm" / "model.safetensors")
    assert (torch.arange(12) + weights["d2t"]).tolist() == list(range(0, 24, 2))  # target id = draft id + d2t
    torch.testing.assert_close(weights["lm_head.weight"], target.get_output_embeddings().weight[0:24:2].detach())
    back = load_dflash(tmp_path / "vllm")
    assert back.draft_vocab.tolist() == list(range(0, 24, 2))
    with pytest.raises(ValueError, match="reduced draft vocabulary"):
        drafter.export(tmp_path / "tf", "transformers")


def test_a_checkpoint_written_in_the_z_lab_layout_loads_and_drafts(target, tmp_path):
    """Written by hand with z-lab's names and config keys (not by our exporter)."""
    torch.manual_seed(3)
    h, inter, heads, kv, hd = 32, 64, 4, 2, 8
    w = {"fc.weight": torch.randn(h, 2 * h) * 0.1, "hidden_norm.weight": torch.ones(h), "norm.weight": torch.ones(h)}
    for i in range(2):
        w |= {
            f"layers.{i}.self_attn.q_proj.weight": torch.randn(heads * hd, h) * 0.1,
            f"layers.{i}.self_attn.k_proj.weight": torch.randn(kv * hd, h) * 0.1,
            f"layers.{i}.self_attn.v_proj.weight": torch.randn(kv * hd, h) * 0.1,
            f"layers.{i}.self_attn.o_proj.weight": torch.randn(h, heads * hd) * 0.1,
            f"layers.{i}.self_attn.q_norm.weight": torch.ones(hd),
            f"layers.{i}.self_attn.k_norm.weight": torch.ones(hd),
            f"layers.{i}.mlp.gate_proj.weight": torch.randn(inter, h) * 0.1,
            f"layers.{i}.mlp.up_proj.weight": torch.randn(inter, h) * 0.1,
            f"layers.{i}.mlp.down_proj.weight": torch.randn(h, inter) * 0.1,
            f"layers.{i}.input_layernorm.weight": torch.ones(h),
            f"layers.{i}.post_attention_layernorm.weight": torch.ones(h),
        }
    (tmp_path / "zlab").mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, tmp_path / "zlab" / "model.safetensors")
    (tmp_path / "zlab" / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["DFlashDraftModel"],
                "model_type": "qwen3",
                "hidden_size": h,
                "intermediate_size": inter,
                "num_hidden_layers": 2,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "head_dim": hd,
                "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0,
                "vocab_size": VOCAB,
                "num_target_layers": 4,
                "block_size": 6,
                "max_position_embeddings": 256,
                "dflash_config": {"target_layer_ids": [0, 2], "mask_token_id": MASK},
            }
        )
    )
    drafter = BlockDiffusionDrafter.from_pretrained(tmp_path / "zlab")
    assert drafter.config.target_layer_ids == [1, 3] and drafter.config.architecture == "dflash"
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5))
    ids = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    out = spec.generate(ids, max_new_tokens=25)
    assert (
        out.token_ids[0].tolist()
        == target.generate(ids, max_new_tokens=25, do_sample=False, pad_token_id=1)[0, 8:].tolist()
    )
    assert out.stats.draft_forwards > 0


def test_what_cannot_be_represented_is_refused_naming_it(target, tmp_path):
    ours = make_drafter(target)  # the dllm architecture
    problems = export_blockers(ours.config, "dflash")
    assert problems and "architecture 'dllm'" in problems[0]
    with pytest.raises(ValueError, match="feature norms"):
        save_dflash(ours.model, tmp_path / "x", "dflash")
    assert not (tmp_path / "x").exists()  # refused before writing anything
    with pytest.raises(ValueError, match="format must be one of"):
        export_blockers(ours.config, "gguf")
    embeds = BlockDiffusionConfig.for_target(
        target, num_layers=1, num_target_layers=2, block_size=6, architecture="dflash", mask_token_id=MASK
    )
    embeds.target_layer_ids = [0, 2]
    assert any("include 0" in p for p in export_blockers(embeds, "dflash"))
    with pytest.raises(ValueError, match="mask_token_id"):
        BlockDiffusionConfig.for_target(target, architecture="dflash")
    with pytest.raises(ValueError, match="inject_last_context"):
        BlockDiffusionConfig.for_target(target, architecture="dflash", mask_token_id=MASK, inject_last_context=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(
        json.dumps({"architectures": ["DFlashDraftModel"], "dflash_config": {}})
    )
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_dflash(tmp_path / "bad")
