"""Drafters behind one protocol (:class:`drafters.base.Drafter`)."""

from __future__ import annotations

from transformers import PreTrainedModel

from drafters.autoregressive import AutoregressiveDrafter
from drafters.block_diffusion import BlockDiffusionConfig, BlockDiffusionDrafter, BlockDiffusionModel
from drafters.base import Drafter, DraftProposal, NullDrafter
from drafters.fallback import FallbackDrafter
from drafters.masked_diffusion import MaskedDiffusionDrafter
from drafters.prompt_lookup import PromptLookupDrafter

__all__ = [
    "Drafter", "DraftProposal", "NullDrafter", "PromptLookupDrafter", "AutoregressiveDrafter",
    "BlockDiffusionDrafter", "BlockDiffusionModel", "BlockDiffusionConfig", "MaskedDiffusionDrafter", "FallbackDrafter",
    "build_drafter",
]


def build_drafter(spec: str, target: PreTrainedModel) -> Drafter:
    """A drafter from a short spec: ``none``, ``prompt-lookup[:MAX_NGRAM]``, ``early-exit[:N]``,
    ``ar:<HF id or path>``, ``block-diffusion[:STEPS]`` (the shipped drafter), or a checkpoint
    directory ``<dir>[:STEPS]`` (a block-diffusion drafter, or else a causal LM used as AR drafter).
    ``A+B`` asks A first and B when A has nothing good (:class:`FallbackDrafter`), e.g.
    ``prompt-lookup+block-diffusion``. Specs never contain ``@``, which the CLI uses to attach a
    block-length policy."""
    import json
    import os

    if "+" in spec:
        first, _, rest = spec.partition("+")
        return FallbackDrafter(build_drafter(first, target), build_drafter(rest, target))

    name, _, arg = spec.partition(":")
    if name in ("none", "ar-baseline"):
        return NullDrafter()
    if name in ("prompt-lookup", "pld"):
        return PromptLookupDrafter(max_ngram=int(arg)) if arg else PromptLookupDrafter()
    if name == "early-exit":
        return AutoregressiveDrafter.from_target_layers(target, int(arg) if arg else None)
    if name == "ar" and arg:
        return AutoregressiveDrafter.from_pretrained(arg, dtype=target.dtype, device=target.device)
    path, steps = spec, None
    if name == "block-diffusion":
        from drafters.shipped import shipped_drafter_dir

        path, steps = str(shipped_drafter_dir()), arg or None
    elif not os.path.isdir(spec) and arg.isdigit():
        path, steps = name, arg
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        meta = json.load(open(config)) if os.path.isfile(config) else {}
        if meta.get("model_type") == BlockDiffusionConfig.model_type:
            return BlockDiffusionDrafter.from_pretrained(path, num_inference_steps=int(steps) if steps else None)
        if any(arch.endswith("ForMaskedLM") for arch in meta.get("architectures") or []):
            return MaskedDiffusionDrafter.from_pretrained(path, dtype=target.dtype, **({"num_inference_steps": int(steps)} if steps else {}))
        return AutoregressiveDrafter.from_pretrained(path, dtype=target.dtype, device=target.device)
    raise ValueError(
        f"unknown drafter {spec!r}: use 'none', 'prompt-lookup', 'early-exit[:N]', 'ar:<path or id>', "
        "'block-diffusion[:STEPS]', a checkpoint directory '<dir>[:STEPS]', or 'A+B' (A first, B as fallback)"
    )
