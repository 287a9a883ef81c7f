"""dllm-spec: lossless speculative decoding with masked-diffusion, autoregressive and prompt-lookup
drafters behind one verifier.

    from dllm_spec import DiffusionSpeculator
    spec = DiffusionSpeculator.from_pretrained()
    out = spec.generate("Explain photosynthesis.", max_new_tokens=128)
    outs = spec.generate(["First prompt", "Second prompt"], max_new_tokens=128)   # a batch
    samples = spec.generate("Write a poem.", temperature=0.7, seed=0, num_return_sequences=4)
"""

from __future__ import annotations

from dllm_spec.config import GenerationParams, SamplingParams, SpeculatorConfig
from dllm_spec.speculator import BatchGenerationOutput, DiffusionSpeculator, GenerationOutput
from dllm_spec.stats import GenerationStats
from dllm_spec.target import load_target

__version__ = "0.1.0"
__all__ = [
    "DiffusionSpeculator",
    "GenerationOutput",
    "BatchGenerationOutput",
    "GenerationStats",
    "GenerationParams",
    "SpeculatorConfig",
    "SamplingParams",
    "load_target",
]
