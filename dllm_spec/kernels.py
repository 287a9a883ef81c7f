"""CPU matmul kernels for the target (and any drafter sharing its layers): every ``nn.Linear`` of a
model can be swapped for :class:`PackedLinear`, which multiplies with oneDNN weights packed once.

Why: in fp32 on CPU, MKL's small-M GEMM path is slow exactly where speculative decoding lives (1 to
a few dozen rows): the 576 -> 49152 LM head of SmolLM2 takes 6.9 / 13.4 / 11.2 ms at M = 1 / 2 / 16
with MKL and 2.4 / 3.2 / 5.1 ms with prepacked oneDNN weights (2 cores, AVX512 machine; the same
pattern on AVX2-only machines). In bf16 oneDNN is already the path and packing gains nothing.

``kernels="auto"`` packs fp32 models on CPU and leaves everything else alone. Different kernels
round differently, so greedy output is exactly the same engine's plain greedy output (same kernels
on both sides), and equals transformers' unpacked greedy output except at floating-point near-ties.
No modeling file is forked: the swap is module-level and works for any transformers causal LM.
"""

from __future__ import annotations

import torch
from torch import nn

KERNELS = ("auto", "packed", "default")


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight also held as a packed oneDNN tensor. ``weight``/``bias`` stay
    the original parameters (shared, not copied), so code reading them and ``state_dict`` see the
    usual layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            self._packed = linear.weight.detach().to_mkldnn()
            bias = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features, dtype=linear.weight.dtype)
            self._packed_bias = bias.to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return nn.functional.linear(x, self.weight, self.bias)  # training: the autograd path
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (..., in) -> (N, in): oneDNN's linear is 2-D
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch._C._nn.mkldnn_linear(flat.to_mkldnn(), self._packed, self._packed_bias).to_dense()
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed=oneDNN"


def packing_pays(model: nn.Module) -> bool:
    """Whether :func:`pack_linears` is the faster path for ``model`` here: fp32 weights on a CPU with oneDNN."""
    param = next(model.parameters(), None)
    return (param is not None and param.device.type == "cpu" and param.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def pack_linears(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`PackedLinear` in place; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
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
    if not torch.backends.mkldnn.is_available():
        raise ValueError("kernels='packed' needs a torch build with oneDNN (mkldnn)")
    pack_linears(model)
    return "packed"
