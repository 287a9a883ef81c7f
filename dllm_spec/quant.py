"""Weight-only int4 linear layers on CPU (``dtype="int4"``): the target's decoder linears keep
4-bit codes, group 32, asymmetric (scale and minimum per group), multiplied by torch's
``_weight_int4pack_mm_for_cpu`` with bf16 activations.

For the embedded default target the codes are the GGUF file's own Q4_1 blocks, taken as they are
(Q4_1 is exactly this format: per 32 weights a scale ``d`` and a minimum ``m``, w = d * q + m,
q in 0..15); any other model is quantized from its weights with the same grouping. The token
embedding and the tied LM head stay bf16 (the GGUF stores them as Q8_0, which this kernel cannot
take); the LM head runs on oneDNN-packed weights (:mod:`dllm_spec.kernels`).

Kernel choice by measurement: the int4 kernel wins at a few rows (it reads a quarter of the
bytes) and loses at many (it dequantizes per tile), so each :class:`Int4Linear` also holds the
dequantized bf16 weight, packed for oneDNN, and switches to that dense bf16 matmul from
``dense_from`` rows, a crossover measured once per weight shape on this CPU (:func:`measure_crossover`).

Precision: ``dtype="int4"`` is its own precision. Greedy speculative output equals the same
engine's plain greedy decoding in int4 (up to bf16 near-ties, as in bf16), not the fp32 model's.

Glossary: N output features, K input features, G = K / group groups per row, M rows of input.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dllm_spec.kernels import FUSED_GROUPS, FusedProjection, SharedInput, pack_weight, packed_linear, packing_supported

GROUP = 32
# llama.cpp's GGUF tensor names -> transformers' Llama module names (decoder linears only)
GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
Q4_1_BLOCK_BYTES = 20  # f16 d, f16 m, 16 bytes of nibbles


def int4_available() -> bool:
    """Whether this torch build has the CPU int4 kernels."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def quantize_groups(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes of ``weight`` (N, K) per ``group`` inputs: codes (N, K) int32 in
    0..15, scale (N, G) and minimum (N, G) float32, w ~ scale * q + minimum."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group}")
    w = weight.detach().float().reshape(n, k // group, group)  # (N, K) -> (N, G, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    codes = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(n, k), scale, lo


def q4_1_blocks(raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode GGUF Q4_1 data (n rows of k // 32 blocks of 20 bytes) into codes (n, k) int32,
    scale d (n, G) and minimum m (n, G) float32. Nibble order: a block's byte j holds weight j in
    its low half and weight j + 16 in its high half."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (n, G)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]  # (n, G, 16)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)  # (n, G, 32)
    return torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d), torch.from_numpy(m)


def _unpermute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its converter interleaves each head's rotary halves),
    as transformers does when it loads a GGUF Llama: rows (heads, 2, d) <- (heads, d, 2)."""
    n = x.shape[0]
    dim = n // heads // 2
    return x.reshape(heads, dim, 2, *x.shape[1:]).swapaxes(2, 1).reshape(x.shape)


class Int4Linear(nn.Module):
    """A bias-free linear layer with 4-bit grouped weights (see the module docstring)."""

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor,
        group: int = GROUP,
        dense_from: int | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = group
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # (G, N, 2) bf16: the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        self.scales_and_zeros = (
            torch.stack([scale.t(), (minimum + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        )
        sz = self.scales_and_zeros.float()
        # the same weights, dequantized with the kernel's bf16 scales, for many rows: (N, K)
        full = (codes.float() - 8).reshape(self.out_features, -1, group) * sz[..., 0].t()[..., None] + sz[..., 1].t()[
            ..., None
        ]
        self.dense = full.reshape(self.out_features, self.in_features).to(torch.bfloat16)
        self._dense_weight = _dense_weight(self.dense)
        self.dense_from = (
            dense_from if dense_from is not None else measure_crossover(self.in_features, self.out_features)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (N, K) bf16 (for code that reads ``.weight``)."""
        return self.dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (..., K) -> (M, K)
        if flat.shape[0] >= self.dense_from:
            out = _dense_matmul(flat, self._dense_weight)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.contiguous(), self.packed, self.group, self.scales_and_zeros
            )
        return out.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4 below {self.dense_from} rows"


def _dense_weight(dense: torch.Tensor) -> torch.Tensor:
    """A dequantized bf16 weight (N, K) as the dense matmul takes it: oneDNN-packed where available."""
    return pack_weight(dense) if packing_supported(dense.dtype) else dense


def _dense_matmul(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, K) @ a weight from :func:`_dense_weight` -> (M, N)."""
    return packed_linear(flat, weight) if weight.is_mkldnn else nn.functional.linear(flat, weight)


#: bytes of weights the crossover measurement cycles through: more than the last-level cache, so each
#: matmul streams its weight from memory as it does inside a model (a hot-cache micro-benchmark
#: favours the dense weight, four times the bytes, and puts the crossover too late)
COLD_BYTES = 96 << 20
#: at most this many copies: a weight small enough to need more is a test model's, not worth the loop
MAX_COPIES = 256


@functools.lru_cache(maxsize=None)
def measure_crossover(
    k: int, n: int, rows: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 64), repeats: int = 7
) -> int:
    """The fewest rows at which the (packed) dense bf16 matmul beats the int4 kernel for a (N, K)
    weight on this CPU (median of ``repeats`` passes over copies of the weight that do not fit in
    cache together); past the last measured size when it never does."""
    torch.manual_seed(0)
    codes, scale, lo = quantize_groups(torch.randn(n, k) * 0.02)
    layer = Int4Linear(codes, scale, lo, dense_from=1 << 30)
    copies = min(MAX_COPIES, max(2, -(-COLD_BYTES // (2 * n * k))))
    int4_weights = [layer.packed.clone() for _ in range(copies)]
    dense_weights = [_dense_weight(layer.dense.clone()) for _ in range(copies)]

    def timed(fn, weights) -> float:
        fn(weights[0])
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in weights:
                fn(w)
            samples.append((time.perf_counter() - t0) / len(weights))
        return float(np.median(samples))

    def dense_wins(m: int) -> bool:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        with torch.inference_mode():
            t_int4 = timed(
                lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, layer.group, layer.scales_and_zeros),
                int4_weights,
            )
            t_dense = timed(lambda w: _dense_matmul(x, w), dense_weights)
        return t_dense < t_int4

    if not dense_wins(rows[-1]):  # the dense path gains with rows: losing at the most rows, it never wins
        return rows[-1] * 2
    return next(m for m in rows if m == rows[-1] or dense_wins(m))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_linears(model: nn.Module, gguf_path: str | Path | None = None) -> int:
    """Swap the decoder linears of a Llama-style ``model`` (bf16, CPU) for :class:`Int4Linear` in
    place (sibling groups: one fused :class:`Int4Linear` behind ``FusedProjection`` members);
    returns how many linears were swapped. With ``gguf_path`` (a Q4_1 GGUF of this very model) the file's codes
    are used as they are, else the weights are quantized (:func:`quantize_groups`)."""
    if not int4_available():
        raise ValueError(
            "dtype='int4' needs torch's CPU int4 kernels (_weight_int4pack_mm_for_cpu), missing from this build"
        )
    blocks = _gguf_q4_1(gguf_path, model) if gguf_path is not None else {}
    weights = {}  # module name -> (codes, scale, minimum)
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.bias is not None or module.in_features % GROUP:
            continue
        if name.endswith("lm_head"):
            continue  # tied to the embedding; stays dense
        weights[name] = blocks[name] if name in blocks else quantize_groups(module.weight)
    swapped = len(weights)
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        for names in FUSED_GROUPS:
            if all(prefix + n in weights for n in names):
                _fuse_group(parent, names, [weights.pop(prefix + n) for n in names])
    for name, (codes, scale, lo) in weights.items():
        _set(model, name, Int4Linear(codes, scale, lo))
    return swapped


def _fuse_group(
    parent: nn.Module, names: tuple[str, ...], parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> None:
    """Sibling linears of ``parent`` that read the same input (q/k/v, gate/up: ``kernels.FUSED_GROUPS``)
    as one :class:`Int4Linear` over their concatenated codes: fewer, larger kernel calls, each output
    column computed as before."""
    fused = Int4Linear(*(torch.cat(x) for x in zip(*parts)))  # codes, scale, minimum stacked along N
    sizes = [codes.shape[0] for codes, _, _ in parts]
    group = SharedInput(fused, sizes)
    start = 0
    for member, (name, size) in enumerate(zip(names, sizes)):
        weight = fused.dense[start : start + size]  # (N_member, K) rows of the dequantized weight
        setattr(parent, name, FusedProjection(weight, None, group, member, kernel="int4"))
        start += size


def _gguf_q4_1(path: str | Path, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Q4_1 decoder linears of a GGUF file, keyed by ``model``'s module names, rows in
    transformers' order (q/k un-permuted as transformers' GGUF loader does)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    cfg = model.config
    out = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")  # blk.{i}.{kind}.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in GGUF_LINEARS:
            continue
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue  # another quantization: this layer is quantized from its weights instead
        k, n = (int(x) for x in tensor.shape)  # ggml order: (row length K, rows N)
        codes, d, m = q4_1_blocks(tensor.data, n, k)
        if parts[2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if parts[2] == "attn_q" else cfg.num_key_value_heads
            codes, d, m = (_unpermute_rows(x, heads) for x in (codes, d, m))
        out[f"model.layers.{parts[1]}.{GGUF_LINEARS[parts[2]]}"] = (codes, d, m)
    return out
