"""Drafters behind one protocol (:class:`drafters.base.Drafter`)."""

from __future__ import annotations

from transformers import PreTrainedModel

from drafters.autoregressive import AutoregressiveDrafter
from drafters.base import Drafter, DraftProposal, NullDrafter
from drafters.prompt_lookup import PromptLookupDrafter

__all__ = ["Drafter", "DraftProposal", "NullDrafter", "PromptLookupDrafter", "AutoregressiveDrafter", "build_drafter"]


def build_drafter(spec: str, target: PreTrainedModel) -> Drafter:
    """A drafter from a short spec: ``none``, ``prompt-lookup``, ``early-exit`` or ``early-exit:N``,
    or ``ar:<HF id or path>`` / a local directory holding a causal LM."""
    name, _, arg = spec.partition(":")
    if name in ("none", "ar-baseline"):
        return NullDrafter()
    if name in ("prompt-lookup", "pld"):
        return PromptLookupDrafter(max_ngram=int(arg)) if arg else PromptLookupDrafter()
    if name == "early-exit":
        return AutoregressiveDrafter.from_target_layers(target, int(arg) if arg else None)
    if name == "ar" and arg:
        return AutoregressiveDrafter.from_pretrained(arg, dtype=target.dtype, device=target.device)
    import os

    if os.path.isdir(spec):
        return AutoregressiveDrafter.from_pretrained(spec, dtype=target.dtype, device=target.device)
    raise ValueError(
        f"unknown drafter {spec!r}: use 'none', 'prompt-lookup', 'early-exit[:N]', 'ar:<path or id>' or a checkpoint directory"
    )
