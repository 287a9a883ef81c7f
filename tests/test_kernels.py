"""oneDNN-packed linear weights (dllm_spec/kernels.py): the same outputs up to rounding, the same
greedy output through the loop, training falls back to autograd, state dicts unchanged, and the
auto choice packs only fp32 on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.kernels import PackedLinear, apply_kernels, pack_linears
from dllm_spec.policy import FixedLength
from drafters import PromptLookupDrafter
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def test_packed_model_matches_the_default_kernels():
    base = tiny_llama(0)
    packed = copy.deepcopy(base)
    assert pack_linears(packed) == 2 * 7 + 1  # 7 per decoder layer and the LM head
    ids = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    assert list(packed.state_dict()) == list(base.state_dict())
    prompt = torch.tensor([[0, 3, 3, 3, 40, 11]])
    want = base.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=1)[0, 6:].tolist()
    out = DiffusionSpeculator(packed, None, PromptLookupDrafter(), policy=FixedLength(4)).generate(prompt, max_new_tokens=24)
    assert out.token_ids[0].tolist() == want


def test_packed_linear_trains_through_autograd():
    layer = PackedLinear(torch.nn.Linear(8, 4))
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_auto_packs_fp32_on_cpu_only():
    assert apply_kernels(tiny_llama(0), "auto") == "packed"
    assert apply_kernels(tiny_llama(0).to(torch.bfloat16), "auto") == "default"
    assert apply_kernels(tiny_llama(0), "default") == "default"
    with pytest.raises(ValueError, match="kernels"):
        apply_kernels(tiny_llama(0), "fast")
