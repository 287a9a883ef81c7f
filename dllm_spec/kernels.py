"""CPU matmul kernels for the target: every ``nn.Linear`` of a model can be swapped for
:class:`PackedLinear`, which multiplies dense activations by oneDNN weights packed once.

Why: on CPU the stock paths are slow exactly where speculative decoding lives (1 to a few dozen
rows). Measured on the 576 -> 49152 LM head of SmolLM2 (2 cores, AVX512-BF16 machine; medians,
interleaved): fp32 MKL takes 7.2 / 14.6 ms at M = 1 / 16 rows and bf16 ``F.linear`` 2.9 / 4.2 ms,
against 2.5 / 3.3 ms (fp32) and 1.1 / 1.8 ms (bf16) with weights prepacked by oneDNN and
multiplied by ``mkldnn._linear_pointwise`` (dense in, dense out: no ``to_mkldnn`` / ``to_dense``
copies). oneDNN chooses the blocked layout from a batch-size hint: packing for one row gives a
layout that is slow for every larger M, a hint of a few rows is as fast at M = 1 and twice as fast
at M = 16 (:data:`PACK_ROWS_HINT`).

``kernels="auto"`` packs fp32 and bf16 models on CPU and leaves everything else alone. Different
kernels round differently, so greedy output is exactly the same engine's plain greedy output (same
kernels on both sides), and equals transformers' unpacked greedy output except at floating-point
near-ties. No modeling file is forked: the swap is module-level and works for any transformers
causal LM (and for any ``nn.Module`` with linears, such as a drafter).
"""

from __future__ import annotations

import torch
from torch import nn

KERNELS = ("auto", "packed", "default")
#: the batch-size hint oneDNN packs weights for (about the rows x tokens of a verify forward)
PACK_ROWS_HINT = 16
#: weight dtypes the packed path serves
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packed_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (``mkldnn._linear_pointwise``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (N, K) CPU weight (fp32 or bf16) reordered once into oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ W.T + bias`` with ``packed`` from :func:`pack_weight`; ``x`` in the weight's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight also held packed for oneDNN. ``weight``/``bias`` stay the
    original parameters (shared, not copied), so code reading them and ``state_dict`` see the usual
    layout; training (grad enabled) takes the autograd path through them."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            self._packed = pack_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return nn.functional.linear(x, self.weight, self.bias)  # training: the autograd path
        return packed_linear(x, self._packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed=oneDNN"


def packing_pays(model: nn.Module) -> bool:
    """Whether :func:`pack_linears` is the faster path for ``model`` here: fp32 or bf16 weights on a
    CPU with oneDNN."""
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cpu" and param.dtype in PACKED_DTYPES and packed_available()


def pack_linears(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` (CPU, fp32/bf16) for a :class:`PackedLinear` in place; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in PACKED_DTYPES:
                setattr(module, child_name, PackedLinear(child))
                swapped += 1
    return swapped


def apply_kernels(model: nn.Module, kernels: str = "auto") -> str:
    """Apply the kernel choice ``"auto"`` (packed where it pays), ``"packed"`` or ``"default"``;
    returns what was applied (``"packed"`` or ``"default"``)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "default" or (kernels == "auto" and not packing_pays(model)):
        return "default"
    if not packed_available():
        raise ValueError("kernels='packed' needs a torch build with oneDNN (mkldnn._linear_pointwise)")
    pack_linears(model)
    return "packed"
