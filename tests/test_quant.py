"""Weight-only int4 (dllm_spec/quant.py): GGUF Q4_1 blocks decode to the weights transformers
de-quantizes, the int4 kernel and its dense fallback multiply by the same weights, and greedy
speculative output in int4 equals the same engine's plain greedy decoding in int4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.policy import FixedLength
from dllm_spec.quant import Int4Linear, int4_available, q4_1_blocks, quantize_groups, quantize_linears
from tests.conftest import make_drafter, tiny_llama

pytestmark = pytest.mark.skipif(not int4_available(), reason="this torch build has no CPU int4 kernels")


def _q4_1_bytes(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """GGUF Q4_1 bytes for codes (n, k) and per-32 d, m (n, k // 32), written independently."""
    n, k = codes.shape
    out = np.zeros((n, k // 32, 20), dtype=np.uint8)
    out[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = m.astype(np.float16)[..., None].view(np.uint8)
    c = codes.reshape(n, k // 32, 32)
    out[..., 4:] = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)
    return out.reshape(n, -1)


def test_q4_1_blocks_decode_codes_scales_and_minima():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (3, 64))
    d, m = rng.random((3, 2)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    got_codes, got_d, got_m = q4_1_blocks(_q4_1_bytes(codes, d, m), 3, 64)
    assert got_codes.tolist() == codes.tolist()
    np.testing.assert_array_equal(got_d.numpy(), d.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got_m.numpy(), m.astype(np.float16).astype(np.float32))


def test_int4_kernel_and_dense_fallback_multiply_by_the_same_weights():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    codes, scale, lo = quantize_groups(w)
    deq = (codes.float().reshape(96, 2, 32) * scale[..., None] + lo[..., None]).reshape(96, 64)
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6  # round-to-nearest: at most half a step
    x = torch.randn(5, 64)
    small, large = Int4Linear(codes, scale, lo, dense_from=1 << 30), Int4Linear(codes, scale, lo, dense_from=1)
    ref = x @ small.weight.float().T
    for layer in (small, large):
        torch.testing.assert_close(layer(x).float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(small(x).float(), large(x).float(), rtol=2e-2, atol=2e-2)
    assert small(x.unsqueeze(0)).shape == (1, 5, 96) and small(x).dtype == x.dtype


def test_greedy_speculative_output_in_int4_equals_plain_int4_decoding():
    target = tiny_llama(0).to(torch.bfloat16)
    assert quantize_linears(target) == 2 * 7  # every decoder linear, not the LM head
    assert type(target.lm_head) is torch.nn.Linear
    drafter = make_drafter(target, 1)
    prompt = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    ref = target.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=1)[0, 8:]
    plain = DiffusionSpeculator(
        target, None, __import__("dllm_spec.drafters", fromlist=["NullDrafter"]).NullDrafter()
    ).generate(prompt, max_new_tokens=30)
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(5)).generate(prompt, max_new_tokens=30)
    assert plain.token_ids[0].tolist() == ref.tolist()
    assert spec.token_ids[0].tolist() == ref.tolist()


def test_int4_is_refused_off_cpu_and_listed_among_dtypes():
    from dllm_spec.target import load_target, resolve_dtype

    with pytest.raises(ValueError, match="CPU only"):
        load_target("nowhere", dtype="int4", device="meta")
    with pytest.raises(ValueError, match="int4"):
        resolve_dtype("int3", torch.device("cpu"))


@pytest.mark.real_model
@pytest.mark.slow
def test_the_ggufs_q4_1_blocks_are_the_weights_transformers_dequantizes(real_spec):
    from dllm_spec.quant import _gguf_q4_1
    from dllm_spec.target import DEFAULT_GGUF_FILE, default_gguf_dir

    target = real_spec.target
    blocks = _gguf_q4_1(default_gguf_dir() / DEFAULT_GGUF_FILE, target)
    assert len(blocks) == 7 * target.config.num_hidden_layers
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.17.mlp.down_proj"):
        codes, d, m = blocks[name]
        w = (codes.float().reshape(codes.shape[0], -1, 32) * d[..., None] + m[..., None]).reshape(codes.shape)
        assert torch.equal(w, target.get_submodule(name).weight.float()), name  # bit for bit, q/k un-permuted
