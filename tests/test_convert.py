"""Converting a dllm drafter to the dflash architecture (dllm_spec/training/convert.py): every
weight that has a counterpart carries over exactly, the static feature scale and q/k norms are
calibrated from features, the mask becomes the nearest target token, and the result drafts with
greedy output unchanged."""

from __future__ import annotations

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters.block_diffusion import BlockDiffusionDrafter
from dllm_spec.policy import FixedLength
from dllm_spec.training.convert import nearest_token, to_dflash_architecture
from dllm_spec.training.features import compute_features
from tests.conftest import make_drafter


def test_conversion_carries_the_weights_and_calibrates_the_rest(target):
    src = make_drafter(target, 1).model
    ids = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7, 31, 3]])
    feats = compute_features(target, ids, torch.ones_like(ids), list(src.config.target_layer_ids))[0]  # (T, width)
    embed = target.get_input_embeddings().weight.detach()
    out = to_dflash_architecture(src, embed, feats)
    assert out.config.architecture == "dflash" and not out.config.inject_last_context and out.mask_embedding is None
    assert out.config.mask_token_id == nearest_token(src.mask_embedding, embed)
    torch.testing.assert_close(out.fuse.weight, src.fuse.weight)
    torch.testing.assert_close(out.layers[0].q_proj.weight, src.layers[0].q_proj.weight)
    h = src.config.target_hidden_size
    rms = feats[:, :h].pow(2).mean(-1).sqrt().median()
    torch.testing.assert_close(out.feature_scale[:h], src.feature_norms[0].weight / rms)
    assert (out.layers[0].k_norm.weight > 0).all() and not torch.equal(
        out.layers[0].k_norm.weight, torch.ones_like(out.layers[0].k_norm.weight)
    )
    drafter = BlockDiffusionDrafter(out)
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5))
    ref = target.generate(ids[:, :8], max_new_tokens=20, do_sample=False, pad_token_id=1)[0, 8:]
    assert spec.generate(ids[:, :8], max_new_tokens=20).token_ids[0].tolist() == ref.tolist()
    with pytest.raises(ValueError, match="expected a 'dllm' drafter"):
        to_dflash_architecture(out, embed, feats)


def test_nearest_token_is_the_most_similar_direction():
    embed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    assert nearest_token(torch.tensor([2.0, 1.9]), embed) == 2
    assert nearest_token(torch.tensor([0.1, -3.0]), -embed) == 1
