"""oneDNN-packed linear weights (dllm_spec/kernels.py): the same outputs up to rounding, the same
greedy output through the loop, training falls back to autograd, state dicts unchanged, the auto
choice packs fp32 and bf16 on CPU only, and the speculator gives a drafter's own linears the
target's kernels."""

from __future__ import annotations

import copy

import pytest
import torch

from dllm_spec import DiffusionSpeculator
from dllm_spec.drafters import PromptLookupDrafter
from dllm_spec.kernels import (
    FusedProjection,
    PackedLinear,
    apply_kernels,
    pack_linears,
    packed_linear,
    packing_supported,
)
from dllm_spec.policy import FixedLength
from tests.conftest import make_drafter, tiny_llama

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
    out = DiffusionSpeculator(packed, None, PromptLookupDrafter(), policy=FixedLength(4)).generate(
        prompt, max_new_tokens=24
    )
    assert out.token_ids[0].tolist() == want


def test_packed_linear_trains_through_autograd():
    layer = PackedLinear(torch.nn.Linear(8, 4))
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


BF16_PACKS = packing_supported(torch.bfloat16)  # oneDNN's bf16 packing needs AVX512-BW/VL/DQ or AVX-NE-CONVERT


def test_auto_packs_fp32_and_bf16_on_cpu_only():
    """apply_kernels("auto") packs what this CPU's oneDNN can pack (bf16 only with AVX512 or AVX-NE-CONVERT)."""
    assert apply_kernels(tiny_llama(0), "auto") == "packed"
    assert apply_kernels(tiny_llama(0).to(torch.bfloat16), "auto") == ("packed" if BF16_PACKS else "default")
    assert apply_kernels(tiny_llama(0).to(torch.float16), "auto") == "default"
    assert apply_kernels(tiny_llama(0), "default") == "default"
    half = tiny_llama(0).to(torch.float16)
    assert pack_linears(half) == 0  # a dtype oneDNN's packed path does not serve is left alone


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_linear_equals_linear_at_every_row_count(dtype, tol):
    if not packing_supported(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40).to(dtype)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for rows in (0, 1, 2, 7, 16, 33):
            x = torch.randn(2, rows, 64).to(dtype)  # 3-D input, as decoder layers pass it
            torch.testing.assert_close(packed(x), linear(x), rtol=tol, atol=tol)


def test_below_packed_from_rows_a_packed_layer_takes_the_stock_path():
    """packed_from: fewer rows than that run F.linear on the original weight (bit for bit), that
    many and more the packed weight; fused sibling groups and the drafter follow the same threshold."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40)
    packed = PackedLinear(linear, packed_from=8)
    with torch.inference_mode():
        for rows in (1, 3):  # 2 x rows < 8 rows in all
            x = torch.randn(2, rows, 64)
            assert torch.equal(packed(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
        x = torch.randn(2, 4, 64)  # 8 rows: packed
        assert torch.equal(packed(x), packed_linear(x, packed._packed, linear.bias))
    model = tiny_llama(0)
    model.dllm_kernels = apply_kernels(model, "packed", packed_from=4)
    assert model.dllm_kernels == "packed from 4 rows" and model.dllm_packed_from == 4
    layer = model.model.layers[0].self_attn
    assert isinstance(layer.q_proj, FusedProjection) and layer.q_proj.packed_from == 4
    drafter = make_drafter(model, 1)
    DiffusionSpeculator(model, None, drafter)
    own = [m for module in drafter.kernel_modules() for m in module.modules() if hasattr(m, "packed_from")]
    assert own and {m.packed_from for m in own} == {4}
    with pytest.raises(ValueError, match="packed_from"):
        pack_linears(tiny_llama(0), packed_from=0)


def test_the_speculator_packs_the_drafters_own_linears_and_keeps_greedy_output():
    target = tiny_llama(0)
    want = target.generate(torch.tensor([[0, 3, 3, 40, 11]]), max_new_tokens=20, do_sample=False, pad_token_id=1)[
        0, 5:
    ].tolist()
    apply_kernels(target, "packed")
    target.dllm_kernels = "packed"
    drafter = make_drafter(target, draft_vocab=12)
    spec = DiffusionSpeculator(target, None, drafter, policy=FixedLength(4))
    own = [m for module in drafter.kernel_modules() for m in module.modules()]
    assert own and not any(type(m) is torch.nn.Linear for m in own)
    assert any(isinstance(m, PackedLinear) for m in drafter._head.modules())  # the reduced-vocabulary head too
    assert spec.generate(torch.tensor([[0, 3, 3, 40, 11]]), max_new_tokens=20).token_ids[0].tolist() == want
    with pytest.raises(ValueError, match="kernels"):
        apply_kernels(tiny_llama(0), "fast")


def test_fused_siblings_give_each_linear_its_own_output_whatever_the_call_order():
    torch.manual_seed(0)
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = (
        torch.nn.Linear(16, 12),
        torch.nn.Linear(16, 4, bias=False),
        torch.nn.Linear(16, 4),
    )
    ref = copy.deepcopy(attn)
    assert pack_linears(attn) == 3
    assert all(isinstance(m, FusedProjection) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    x, y = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        for name in ("k_proj", "q_proj", "v_proj", "q_proj"):  # any order, repeated calls
            torch.testing.assert_close(getattr(attn, name)(x), getattr(ref, name)(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn.v_proj(y), ref.v_proj(y), rtol=1e-5, atol=1e-5)  # a new input: computed afresh
        attn.q_proj(x)
        x.add_(1.0)  # modified in place after the group ran: not served from the stale result
        torch.testing.assert_close(attn.k_proj(x), ref.k_proj(x), rtol=1e-5, atol=1e-5)
    assert list(attn.state_dict()) == list(ref.state_dict())


def test_fusion_leaves_groups_alone_when_incomplete_or_mismatched():
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.down_proj = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)  # no up_proj: nothing to fuse
    assert pack_linears(mlp) == 2 and isinstance(mlp.gate_proj, PackedLinear)
    odd = torch.nn.Module()
    odd.gate_proj, odd.up_proj = torch.nn.Linear(8, 16), torch.nn.Linear(4, 16)  # different inputs
    assert pack_linears(odd) == 2 and isinstance(odd.up_proj, PackedLinear)
    assert pack_linears(tiny_llama(0), fuse=False) == 2 * 7 + 1


def test_packed_models_run_under_autocast_and_refuse_other_dtypes_as_linear_does():
    base = tiny_llama(0)
    packed = copy.deepcopy(base)
    pack_linears(packed)
    ids = torch.tensor([[0, 5, 9, 14, 5, 9, 22, 7]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks bf16: the stock path
        torch.testing.assert_close(packed(ids).logits, base(ids).logits, rtol=0, atol=0)
    layer = PackedLinear(torch.nn.Linear(8, 4))
    with torch.no_grad(), pytest.raises(RuntimeError, match="same dtype"):  # nn.Linear's own error, not oneDNN's
        layer(torch.randn(3, 8, dtype=torch.bfloat16))


def test_a_fused_group_lets_go_of_its_activations_once_every_member_took_its_part():
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = (torch.nn.Linear(16, n, bias=False) for n in (8, 4, 4))
    pack_linears(attn)
    group = attn.q_proj._group
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        attn.q_proj(x)
        attn.k_proj(x)
        assert group._input is x  # v has not taken its part yet
        attn.v_proj(x)
    assert group._input is None and group._outputs == ()
