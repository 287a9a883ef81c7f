"""dllm-spec: lossless speculative decoding with masked-diffusion, autoregressive and prompt-lookup
drafters behind one verifier.

    from dllm_spec import DiffusionSpeculator
    spec = DiffusionSpeculator.from_pretrained()
    out = spec.generate("Explain photosynthesis.", max_new_tokens=128)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DiffusionSpeculator", "GenerationOutput", "GenerationStats", "SpeculatorConfig", "SamplingParams", "load_target"]

if TYPE_CHECKING:  # pragma: no cover
    from dllm_spec.config import SamplingParams, SpeculatorConfig
    from dllm_spec.speculator import DiffusionSpeculator, GenerationOutput
    from dllm_spec.stats import GenerationStats
    from dllm_spec.target import load_target

_LAZY = {
    "DiffusionSpeculator": "dllm_spec.speculator",
    "GenerationOutput": "dllm_spec.speculator",
    "GenerationStats": "dllm_spec.stats",
    "SpeculatorConfig": "dllm_spec.config",
    "SamplingParams": "dllm_spec.config",
    "load_target": "dllm_spec.target",
}


def __getattr__(name: str) -> Any:
    # Lazy: drafters/ and verify/ import dllm_spec submodules, so the package must not import them eagerly.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dllm_spec' has no attribute {name!r}")
