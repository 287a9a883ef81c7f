"""CPU matmul kernels for the target and the drafter: every ``nn.Linear`` of a model can be swapped
for :class:`PackedLinear`, which multiplies dense activations by oneDNN weights packed once.

Why: on CPU the stock paths are slow exactly where speculative decoding lives (1 to a few dozen
rows). Measured on the 576 -> 49152 LM head of SmolLM2 (2 cores, AVX512-BF16 machine; medians,
interleaved): fp32 MKL takes 7.2 / 14.6 ms at M = 1 / 16 rows and bf16 ``F.linear`` 2.9 / 4.2 ms,
against 2.5 / 3.3 ms (fp32) and 1.1 / 1.8 ms (bf16) with weights prepacked by oneDNN and
multiplied by ``mkldnn._linear_pointwise`` (dense in, dense out: no ``to_mkldnn`` / ``to_dense``
copies). oneDNN chooses the blocked layout from a batch-size hint: packing for one row gives a
layout that is slow for every larger M, a hint of a few rows is as fast at M = 1 and twice as fast
at M = 16 (:data:`PACK_ROWS_HINT`).

Sibling projections that read the same input (q/k/v, gate/up: :data:`FUSED_GROUPS`) are also
multiplied as one matmul over their concatenated weights (:class:`FusedProjection`): 4 calls per
decoder layer instead of 7, a one-token step 7-9% faster. Each output column is computed as before,
so the logits are the same as unfused packing (bit for bit here).

``kernels="auto"`` packs fp32 and bf16 models on CPU where that is measured to be faster
(:mod:`dllm_spec.kernel_choice`) and leaves everything else alone. Where the packed path wins only
from some number of rows on (an AVX2 CPU: stock MKL is faster for one row, oneDNN's packed weight for
a 16-token verify), a packed layer keeps the stock path below ``packed_from`` rows: it holds both
weights anyway. Different
kernels round differently, so greedy output is exactly the same engine's plain greedy output (same
kernels on both sides), and equals transformers' unpacked greedy output except at floating-point
near-ties. No modeling file is forked: the swap is module-level and works for any transformers
causal LM (and for any ``nn.Module`` with linears, such as a drafter). The packed copy is taken
once, at the swap: weights loaded into the model afterwards need the swap again.
"""

from __future__ import annotations

from collections.abc import Callable

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


def stock_path(x: torch.Tensor, weight: torch.Tensor, packed_from: int = 1) -> bool:
    """Whether a packed layer takes ``F.linear`` instead: training (autograd through the
    parameters), autocast (it picks the compute dtype), an input in another dtype, or fewer than
    ``packed_from`` rows (where stock was measured faster)."""
    return (
        (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or x.dtype != weight.dtype
        or torch.is_autocast_enabled(x.device.type)
        or (packed_from > 1 and x.numel() < packed_from * x.shape[-1])  # rows = numel / K
    )


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight also held packed for oneDNN. ``weight``/``bias`` stay the
    original parameters (shared, not copied), so code reading them and ``state_dict`` see the usual
    layout; training, autocast, inputs of another dtype and fewer than ``packed_from`` rows take
    ``F.linear`` on them (:func:`stock_path`)."""

    def __init__(self, linear: nn.Linear, packed_from: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed_from = packed_from
        with torch.no_grad():
            self._packed = pack_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if stock_path(x, self.weight, self.packed_from):
            return nn.functional.linear(x, self.weight, self.bias)
        return packed_linear(x, self._packed, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"packed=oneDNN from {self.packed_from} rows"
        )


#: sibling linears that modeling code calls on the same input tensor, one after another
#: (transformers' names for Llama-family attention and gated MLPs)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _version(x: torch.Tensor) -> int:
    """``x``'s in-place version counter; inference-mode tensors keep none (-1): for them the group
    relies on the object alone, which decoder layers never modify between sibling calls."""
    return -1 if x.is_inference() else x._version


class SharedInput:
    """A group of sibling linears computed as one: ``matmul`` maps an input (..., K) to the
    concatenated outputs (..., sum of ``sizes``); the last result is kept for the other members."""

    def __init__(self, matmul: Callable[[torch.Tensor], torch.Tensor], sizes: list[int]) -> None:
        self.matmul, self.sizes = matmul, sizes
        self._input: torch.Tensor | None = None
        self._version = -1
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._waiting: set[int] = set()  # members that have not taken their output of the last input

    @classmethod
    def packed(cls, linears: list[nn.Linear]) -> "SharedInput":
        """The group's weights (and biases) concatenated and packed for oneDNN."""
        with torch.no_grad():
            weight = pack_weight(torch.cat([lin.weight.detach() for lin in linears]))
            biases = [
                lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
                for lin in linears
            ]
            bias = torch.cat(biases) if any(lin.bias is not None for lin in linears) else None
        return cls(lambda x: packed_linear(x, weight, bias), [lin.out_features for lin in linears])

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member ``member``'s output for ``x``: the whole group is computed once per input tensor
        (the same object, not modified in place since), and each member takes its columns once.
        The group holds its input and outputs only until every member has taken its part (then a
        long prefill's activations are not kept alive); while it holds the input, that object
        cannot be replaced by another at the same address."""
        version = _version(x)
        if self._input is not x or self._version != version or member not in self._waiting:
            fused = self.matmul(x)  # (..., sum of sizes)
            self._input, self._version = x, version
            self._outputs = fused.split(self.sizes, dim=-1)
            self._waiting = set(range(len(self.sizes)))
        out = self._outputs[member]
        self._waiting.discard(member)
        if not self._waiting:
            self._input, self._outputs = None, ()
        return out


class FusedProjection(nn.Module):
    """One linear of a group of siblings that read the same input (q/k/v, gate/up): the first one
    called on an input runs the group's single matmul (:class:`SharedInput`), the others take their
    columns of it.
    ``weight``/``bias`` stay the original parameters, so ``state_dict`` is unchanged; training,
    autocast, inputs of another dtype and fewer than ``packed_from`` rows take ``F.linear`` on them,
    member by member (:func:`stock_path`)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group: SharedInput,
        member: int,
        kernel: str = "oneDNN",
        packed_from: int = 1,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.packed_from = packed_from
        self._group, self._member, self._kernel = group, member, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if stock_path(x, self.weight, self.packed_from):
            return nn.functional.linear(x, self.weight, self.bias)
        return self._group.output(x, self._member)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._kernel}, fused member {self._member} of {len(self._group.sizes)}"
        )


def _packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype in PACKED_DTYPES


def _fuse_siblings(module: nn.Module, packed_from: int = 1) -> int:
    """Swap each complete group of :data:`FUSED_GROUPS` among ``module``'s children for
    :class:`FusedProjection` members; returns how many linears were swapped."""
    swapped = 0
    children = dict(module.named_children())
    for names in FUSED_GROUPS:
        linears = [children.get(name) for name in names]
        if not all(lin is not None and _packable(lin) for lin in linears):
            continue
        if len({(lin.in_features, lin.weight.dtype) for lin in linears}) != 1:
            continue
        group = SharedInput.packed(linears)
        for member, (name, lin) in enumerate(zip(names, linears)):
            setattr(module, name, FusedProjection(lin.weight, lin.bias, group, member, packed_from=packed_from))
            swapped += 1
    return swapped


_SUPPORTED: dict[torch.dtype, bool] = {}


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack a weight of ``dtype`` on this CPU (bf16 needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT: on an AVX2-only CPU it raises)."""
    if dtype not in _SUPPORTED:
        ok = dtype in PACKED_DTYPES and packed_available()
        if ok:
            try:
                packed_linear(torch.zeros(1, 32, dtype=dtype), pack_weight(torch.zeros(32, 32, dtype=dtype)))
            except RuntimeError:
                ok = False
        _SUPPORTED[dtype] = ok
    return _SUPPORTED[dtype]


def packing_pays(model: nn.Module) -> bool:
    """Whether :func:`pack_linears` can run ``model`` here: fp32 or bf16 weights on a CPU whose oneDNN
    packs that dtype. (Whether it is also faster is measured by :mod:`dllm_spec.kernel_choice`,
    which ``load_target(kernels="auto")`` consults.)"""
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cpu" and packing_supported(param.dtype)


def pack_linears(model: nn.Module, fuse: bool = True, packed_from: int = 1) -> int:
    """Swap every ``nn.Linear`` of ``model`` (CPU, fp32/bf16) in place for a packed one: sibling
    groups for :class:`FusedProjection` members (``fuse``), the rest for :class:`PackedLinear`, each
    on the stock path below ``packed_from`` rows; returns how many linears were swapped."""
    if packed_from < 1:
        raise ValueError(f"packed_from must be >= 1, got {packed_from}")
    swapped = 0
    for module in list(model.modules()):
        if fuse:
            swapped += _fuse_siblings(module, packed_from)
        for child_name, child in list(module.named_children()):
            if _packable(child):
                setattr(module, child_name, PackedLinear(child, packed_from))
                swapped += 1
    return swapped


def apply_kernels(model: nn.Module, kernels: str = "auto", packed_from: int = 1) -> str:
    """Apply the kernel choice ``"auto"`` (packed where it pays), ``"packed"`` or ``"default"``,
    the packed path from ``packed_from`` rows on; returns what was applied (``"default"``,
    ``"packed"``, or ``"packed from N rows"``). The model records ``packed_from`` as
    ``dllm_packed_from`` (its drafter's linears follow it)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "default" or (kernels == "auto" and not packing_pays(model)):
        return "default"
    if not packed_available():
        raise ValueError("kernels='packed' needs a torch build with oneDNN (mkldnn._linear_pointwise)")
    pack_linears(model, packed_from=packed_from)
    model.dllm_packed_from = packed_from
    return "packed" if packed_from == 1 else f"packed from {packed_from} rows"
